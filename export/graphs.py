"""The bundle's two graphs: the encoder (once per turn) and the decoder step (once per token).

encoder.onnx, once per turn (S = context length <= 160):

    x    = LN_emb(E[ids] * sqrt(d) + P_enc[0:S])                               [B, S, d]
    x    = encoder layers (post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x)))   [B, S, d]
    K, V = x @ W_kv + b_kv, for every decoder layer's cross-attention          [B, N, S, H] each

decoder_step.onnx, once per decoder position (B sequences, one token each, row b at its own
position t_b; sequences of a batch join and leave between steps):

    x    = LN_emb(E[id_b]) + P_dec[t_b]                (no sqrt(d): see step_graph)  [B, 1, d]
    x    = decoder layers: self-attention over row b's KV cache positions 0..t_b, cross-attention
           over the first n_b (source_length) of the encoder's K, V, FFN; each post-LN   [B, 1, d]

The self-attention cache is one buffer per layer and kind, [B, N, C, H] (C = capacity, the
position table's 512 at most), that the step writes in place: GroupQueryAttention (kv heads =
heads) appends this position's k, v at index t_b of row b when its past and present are the same
buffer, so a step copies nothing of the cache (MultiHeadAttention's past -> present copied all of
it at every token). Positions past t_b are never read: a row that is stepped again at the same
position overwrites its own slot.
    hidden = h = x                                                              [B, d]   (output)
    h'   = STAR.step(h, (m, l, a))                                              [B, d]   (h' = h without STAR)
    logits = h' @ E^T + b                                                       [B, V]   (read at t >= 1)
           (a trimmed head: h' @ E^T[:, ids] + b[ids], [B, V_out], ids = the tokens training produced)

The strategy logits, h_0 @ E[strategy ids]^T + b[strategy ids] (8 x d, once per reply), are
computed by the runtime from `hidden` at t = 0 (star_runtime.engine.StrategyHead): in the graph
they would cost a Gather and a Gemm at every position.

STAR's streaming pool (kernels/reference.py, StarModule.step) with m, l kept [B, 1]:

    s  = tanh(h W_a + b_a) q;   m' = max(m, s);   l' = l e^{m-m'} + e^{s-m'}
    a' = a e^{m-m'} + e^{s-m'} h;   z = a' / l'
    g  = sigmoid(relu(z W_g1 + b_g1) W_g2 + b_g2);   hhat = relu(z W_p1 + b_p1) W_p2 + b_p2
    h' = h + g (hhat - h)                                  (= g hhat + (1 - g) h)

Tensor names are star_runtime.spec's (optimum's scheme), the ones the runtime binds. Ops are
onnxruntime's fused ones: a decoder layer is 19 nodes (6 MatMul, GroupQueryAttention reading
the packed q|k|v, MultiHeadAttention, 3 LayerNormalization with the 6 Adds of their residuals and
biases, BiasGelu, the Adds of the q|k|v and cross-attention query biases) where optimum's
decoder_with_past_model has about 170. onnxruntime's transformer optimizer
(model_type "bart") finds nothing left to fuse in either graph. With int8
weights each MatMul is a DynamicQuantizeMatMul in the encoder and a MatMulNBits in the
step graph (weights.py says why).
"""

from __future__ import annotations

import numpy as np

from star_export.graph_builder import MS_DOMAIN, GraphBuilder
from star_export.weights import EMBED, EMBED_SCALE, EMBED_T, LM_BIAS, LM_WEIGHT, Dims
from star_runtime.spec import HOST_OUTPUTS, STAR_STATE, STEP_INPUTS, kv_names, star_names


class _Ops:
    """The graph pieces, for one precision: float32, float16 (CUDA) or int8 weights."""

    def __init__(self, b: GraphBuilder, dims: Dims, precision: str) -> None:
        self.b, self.dims, self.precision = b, dims, precision
        self.float = np.float16 if precision == "float16" else np.float32

    def matmul(self, x: str, name: str, bias: str | None = None) -> str:
        """x @ W (+ bias, else the next op adds it); int8 in either format of weights.py."""
        b = self.b
        if self.precision != "int8":
            return b.op("MatMul", [x, b.weight(name)])
        stored = b.weights.tensors[name]
        if stored.dtype == np.int8:  # [K, N], per-column scales
            return b.op("DynamicQuantizeMatMul", [x, b.weight(name), b.weight(name + ".scale"), "", bias or ""],
                        domain=MS_DOMAIN)
        n, blocks, size = stored.shape  # uint8 [N, K/B, B]
        return b.op("MatMulNBits", [x, b.weight(name), b.weight(name + ".scale"), "", "", bias or ""],
                    domain=MS_DOMAIN, K=blocks * size, N=n, bits=8, block_size=size, accuracy_level=4)

    def dense(self, x: str, name: str, bias: str | None = None) -> str:
        """x @ W + bias (default `name.bias`): one int8 op with its bias, else MatMul + Add (which
        onnxruntime fuses into one Gemm when x is 2-D, as in STAR)."""
        b = self.b
        bias = bias or name + ".bias"
        if self.precision == "int8":
            return self.matmul(x, name, b.weight(bias))
        return b.op("Add", [b.op("MatMul", [x, b.weight(name)]), b.weight(bias)])

    def embed(self, ids: str, scale: float = 1.0) -> str:
        """E[ids] * scale for ids [B, S]: [B, S, d].

        float: rows of E [V, d] (a trimmed head), else columns of the input E^T (Gather on axis 1,
        then [d, B, S] -> [B, S, d]); int8: rows of E_q [V, d/B, B], dequantized: (q - 128) * scale
        of each block.
        """
        b = self.b
        if self.precision == "int8":
            rows = b.op("Add", [b.op("Cast", [b.op("Gather", [b.weight(EMBED), ids])], to=1),  # to=1: float32
                                b.const([-128.0], np.float32)])  # [B, S, d/B, B]
            scales = b.op("Unsqueeze", [b.op("Gather", [b.weight(EMBED_SCALE), ids]), b.const([-1])])  # [B, S, d/B, 1]
            rows = b.op("Reshape", [b.op("Mul", [rows, scales]), b.const([0, 0, -1])])
        elif EMBED in b.weights.tensors:
            rows = b.op("Gather", [b.weight(EMBED), ids])
        else:
            rows = b.op("Transpose", [b.op("Gather", [self.embedding_t(), ids], axis=1)], perm=[1, 2, 0])
        return rows if scale == 1.0 else b.op("Mul", [rows, b.const([scale], self.float)])

    def embedding_t(self) -> str:
        """The float graphs' E^T [d, V]: a graph INPUT, which the runtime binds to one array that
        both graphs share. As an input it is never prepacked, so memory holds it once (a prepacked
        copy would add 112 MB for the 90M model and was no faster: 6.2 ms against 5.9 ms)."""
        if not any(i.name == EMBED_T for i in self.b.inputs):
            self.b.input(EMBED_T, self.float, [self.dims.d_model, self.dims.vocab_size])
        return EMBED_T

    def lm_head(self, h: str) -> tuple[str, int]:
        """h @ E^T + b for h [B, d]: [B, V], or with a trimmed head h @ W_out + b_out: [B, V_out];
        and the number of outputs. A trimmed head is its own initializer, which onnxruntime prepacks."""
        b = self.b
        # The shared E^T is a graph input, never prepacked, so onnxruntime packs it again at every
        # call with 2 rows or more (the float32 90M head alone: 14.7 ms for 2 rows, 5.2 ms for 1).
        if LM_WEIGHT in b.weights.tensors:
            stored = b.weights.tensors[LM_WEIGHT]
            size = stored.shape[0] if self.precision == "int8" else stored.shape[1]
            return self.dense(h, LM_WEIGHT, bias=LM_BIAS), size
        if self.precision == "int8":
            return self.matmul(h, EMBED, b.weight(LM_BIAS)), self.dims.vocab_size
        return b.op("Add", [b.op("MatMul", [h, self.embedding_t()]), b.weight(LM_BIAS)]), self.dims.vocab_size

    def skip_norm(self, x: str, skip: str, norm: str, bias: str) -> str:
        """LN(x + bias + skip): the matmul's bias, the residual add and the post-LN.

        Two Adds and LayerNormalization, not onnxruntime's SkipLayerNormalization, which does
        the same in one op but slower on CPU: 298 against 130 us on [1, 160, 512], 30 against
        17 us on [8, 1, 512], the same 9 us on [1, 1, 512] (onnxruntime 1.32, 2 threads).
        """
        b = self.b
        s = b.op("Add", [b.op("Add", [x, b.weight(bias)]), skip])
        return self.layer_norm(s, norm)

    def layer_norm(self, x: str, norm: str) -> str:
        b = self.b
        return b.op("LayerNormalization", [x, b.weight(norm + ".gamma"), b.weight(norm + ".beta")],
                    axis=-1, epsilon=self.dims.layer_norm_eps)

    def ffn(self, x: str, prefix: str, norm: str) -> str:
        """LN(x + fc2(gelu(fc1(x))))."""
        h = self.b.op("BiasGelu", [self.matmul(x, prefix + ".fc1"), self.b.weight(prefix + ".fc1.bias")],
                      domain=MS_DOMAIN)
        return self.skip_norm(self.matmul(h, prefix + ".fc2"), x, norm, prefix + ".fc2.bias")

    def self_attention(self, x: str, prefix: str, heads: int) -> str:
        """The encoder's attention output [B, S, d] before out_proj (no mask: rows of one length)."""
        b = self.b
        q, k, v = b.op("Split", [self.matmul(x, prefix)], 3, axis=2)
        return b.op("MultiHeadAttention", [q, k, v, b.weight(prefix + ".bias")], domain=MS_DOMAIN, num_heads=heads)

    def cached_attention(self, x: str, prefix: str, heads: int, cache: tuple[str, str], present: tuple[str, str],
                         past_length: str, total_length: str) -> str:
        """The decoder's self-attention output [B, 1, d]: row b attends to its cache positions
        0..past_length[b] - 1 and to itself, whose k, v the op writes at index past_length[b] of
        `cache` (in place when the runtime binds `present` to the same buffers)."""
        b = self.b
        qkv = self.dense(x, prefix)  # [B, 1, 3d], read packed: no Split op (2% of a 90M int8 step)
        return b.op("GroupQueryAttention", [qkv, "", "", *cache, past_length, total_length],
                    [b.fresh("attn"), *present], domain=MS_DOMAIN, num_heads=heads, kv_num_heads=heads)[0]


def encoder_graph(b: GraphBuilder, dims: Dims, precision: str) -> None:
    """Context ids [B, S] -> the cross-attention K, V of every decoder layer, [B, N, S, H] each.

    The rows of a batch must have the same length (no padding mask: the runtime runs batch 1).
    """
    o = _Ops(b, dims, precision)
    ids = b.input("input_ids", np.int64, ["batch", "source"])
    with b.named("embed"):
        length = b.op("Slice", [b.op("Shape", [ids]), b.const([1]), b.const([2])])  # [1] = S
        pos = b.op("Slice", [b.weight("enc.pos"), b.const([0]), length, b.const([0])])  # [S, d]
        x = o.layer_norm(b.op("Add", [o.embed(ids, dims.embed_scale), pos]), "enc.ln_emb")
    for i in range(dims.encoder_layers):
        p = f"enc.{i}"
        with b.named(p + ".attn"):
            a = o.self_attention(x, p + ".qkv", dims.encoder_heads)
            x = o.skip_norm(o.matmul(a, p + ".out"), x, p + ".ln1", p + ".out.bias")
        with b.named(p + ".ffn"):
            x = o.ffn(x, p, p + ".ln2")
    n, hd = dims.decoder_heads, dims.d_model // dims.decoder_heads
    names = []
    for i in range(dims.decoder_layers):
        with b.named(f"dec.{i}.cross_kv"):
            kv = o.dense(x, f"dec.{i}.cross_kv")  # [B, S, 2d]
            kv = b.op("Reshape", [kv, b.const([0, 0, 2 * n, hd])])  # [B, S, 2N, H]
            kv = b.op("Transpose", [kv], perm=[0, 2, 1, 3])  # [B, 2N, S, H]
            layer = list(kv_names(i, "encoder")[2:])
            b.op("Split", [kv], layer, axis=1)
            names += layer
    for name in names:
        b.output(name, name, o.float, ["batch", n, "source", hd])


def step_graph(b: GraphBuilder, dims: Dims, precision: str) -> None:
    """One decoder position for B sequences: see the module docstring."""
    o = _Ops(b, dims, precision)
    d, n = dims.d_model, dims.decoder_heads
    hd = d // n
    ids = b.input(STEP_INPUTS[0], np.int64, ["batch", 1])
    position = b.input(STEP_INPUTS[1], np.int32, ["batch"])  # t_b: also row b's past length
    source_length = b.input(STEP_INPUTS[2], np.int32, ["batch"])  # n_b: row b's encoder positions
    for i in range(dims.decoder_layers):
        for kind, length in (("decoder", "capacity"), ("encoder", "source")):
            for name in kv_names(i, kind)[:2]:
                b.input(name, o.float, ["batch", n, length, hd])
    state = [b.input(star_names(s)[0], o.float, ["batch", d if s == "sum" else 1]) for s in STAR_STATE]

    # transformers' BlenderBot-Small decoder (4.57) neither scales the embedding by sqrt(d) (the
    # encoder does) nor adds positions before its LN; with embeddings of std 0.02 the LN's eps
    # makes the scale visible (1e-4 on the logits), so the graph follows the code exactly.
    with b.named("embed"):
        x = o.layer_norm(o.embed(ids), "dec.ln_emb")
        pos = b.op("Unsqueeze", [b.op("Gather", [b.weight("dec.pos"), position]), b.const([1])])  # [B, 1, d]
        x = b.op("Add", [x, pos])
        total = b.op("Add", [b.op("ReduceMax", [position], keepdims=1), b.const([1], np.int32)])  # [1]: max t_b + 1
    presents = []
    for i in range(dims.decoder_layers):
        p = f"dec.{i}"
        pk, pv, ck, cv = kv_names(i, "decoder")
        ek, ev, _, _ = kv_names(i, "encoder")
        presents += [ck, cv]
        with b.named(p + ".self_attn"):
            a = o.cached_attention(x, p + ".self_qkv", n, (pk, pv), (ck, cv), position, total)
            x = o.skip_norm(o.matmul(a, p + ".self_out"), x, p + ".ln1", p + ".self_out.bias")
        with b.named(p + ".cross_attn"):
            # The bias goes on q before the op: MultiHeadAttention with pre-projected [B, N, S, H] keys
            # and values takes no bias in older onnxruntime releases (and their CUDA kernels). The
            # 1-D mask is each row's key count: the keys after it (a batch's padding) get no weight.
            a = b.op("MultiHeadAttention", [o.dense(x, p + ".cross_q"), ek, ev, "", source_length], domain=MS_DOMAIN,
                     num_heads=n)
            x = o.skip_norm(o.matmul(a, p + ".cross_out"), x, p + ".ln2", p + ".cross_out.bias")
        with b.named(p + ".ffn"):
            x = o.ffn(x, p, p + ".ln3")
    h = b.op("Reshape", [x, b.const([-1, d])])  # [B, d]
    with b.named("star"):
        fused, new_state = _star_step(o, h, state) if dims.use_star else (h, state)
    with b.named("lm_head"):
        logits, outputs = o.lm_head(fused)  # [B, V_out]
    if o.float is np.float16:  # the host reads float32
        logits, h = (b.op("Cast", [t], to=1) for t in (logits, h))
    logits_name, hidden_name = HOST_OUTPUTS
    b.output(logits, logits_name, np.float32, ["batch", outputs])
    b.output(h, hidden_name, np.float32, ["batch", d])
    for name in presents:
        b.output(name, name, o.float, ["batch", n, "capacity", hd])
    for s, value in zip(STAR_STATE, new_state):
        b.output(value, star_names(s)[1], o.float, ["batch", d if s == "sum" else 1])


def _star_step(o: _Ops, h: str, state: list[str]) -> tuple[str, list[str]]:
    """h' and the new pooling state (module docstring); h [B, d]."""
    b = o.b
    m, l, a = state
    s = b.op("MatMul", [b.op("Tanh", [o.dense(h, "star.score")]), b.weight("star.score_vec")])  # [B, 1]
    m2 = b.op("Max", [m, s])
    keep, new = b.op("Exp", [b.op("Sub", [m, m2])]), b.op("Exp", [b.op("Sub", [s, m2])])  # [B, 1]
    l2 = b.op("Add", [b.op("Mul", [l, keep]), new])
    a2 = b.op("Add", [b.op("Mul", [a, keep]), b.op("Mul", [h, new])])  # [B, d]
    z = b.op("Div", [a2, l2])
    u = b.op("Relu", [o.dense(z, "star.fc1")])  # [B, gh + rh]
    ug, up = b.op("Split", [u, b.const([o.dims.gate_hidden, o.dims.refine_hidden])], 2, axis=1)
    g = b.op("Sigmoid", [o.dense(ug, "star.gate_fc2")])  # [B, d] or [B, 1]
    refined = o.dense(up, "star.refine_fc2")  # [B, d]
    fused = b.op("Add", [h, b.op("Mul", [g, b.op("Sub", [refined, h])])])
    return fused, [m2, l2, a2]

