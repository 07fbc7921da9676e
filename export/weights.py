"""The model's weights in the layout the bundle's graphs read, in float32, float16 or int8.

Every matrix is stored as W [in, out] (so a graph computes x @ W; torch's Linear keeps [out, in]).
Weights read by the same input are concatenated so that one MatMul reads them all:

    enc.{i}.qkv      [d, 3d]       q_proj | k_proj | v_proj of encoder layer i
    dec.{i}.self_qkv [d, 3d]       the decoder's self-attention, the same way
    dec.{i}.cross_kv [d, 2d]       k_proj | v_proj of decoder layer i's cross-attention, computed
                                   once per turn from the encoder output; one matrix per layer, not
                                   one [d, 2 L d], so that the encoder's intermediates are one
                                   layer's [S, 2d] (at 90M, S = 160, a run held 25 MB with the
                                   whole [S, 2 L d] projection and its transposed copy, 17 MB so)
    star.fc1         [d, gh + rh]  STAR's gate_fc1 | refine_fc1 (both read the pooled state z)
    embed.weight_t   [d, V]        float: the token embedding, transposed, so the LM head is one
                                   MatMul x @ E^T (on the dev machine 5.9 ms, against 12 ms for
                                   Gemm with transB on E [V, d]); a token's embedding is a column
    embed.weight     [V, d]        float with a trimmed LM head (lm.weight): E itself, which only
                                   the lookups read, and a token's embedding is a row (gathering
                                   160 columns of E^T took 1.8 ms, 160 rows of E 0.05 ms)

int8 weights come in two formats, each where onnxruntime's kernel for it is the faster one (dev
machine, 2 threads, the 48 matrices of the 90M decoder):

    encoder graph (M = S <= 160 rows): W_q int8 [K, N] = round(W / s), s [N] = max_i |W_ij| / 127,
        one scale per output column, read by DynamicQuantizeMatMul (20 ms, against 31 ms for
        MatMulNBits);
    step graph (M = 1 row): blocks of B <= 256 inputs, W_q uint8 [N, K / B, B] = round(W^T / s) + 128,
        s [N, K / B], read by MatMulNBits (bits 8, accuracy level 4: activations quantized per
        block; 1.5 ms, against 2.4 ms for DynamicQuantizeMatMul).

The embedding is in the second format with K = d, one block per token's row when d <= 256
(embed.weight [V, d/B, B], embed.weight.scale [V, d/B]): MatMulNBits reads it as the LM head
(0.47 ms, against 1.27 ms), and both graphs' lookups dequantize gathered rows; no float copy of it
is stored. LayerNorm parameters, biases and position embeddings stay float (2 MB of 93 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from star_runtime.spec import OUTPUT_IDS
from star_training.model import StarForConditionalGeneration

EMBED_T = "embed.weight_t"  # float bundles with the whole LM head: E^T [d, V], a graph input (see graphs.py)
EMBED = "embed.weight"  # int8: E_q [V, d/B, B] and its scales [V, d/B]; float, trimmed head: E [V, d]; initializers
EMBED_SCALE = "embed.weight.scale"  # a matrix's scales are `name.scale`
LM_BIAS = "lm.bias"
LM_WEIGHT = "lm.weight"  # a trimmed LM head: E^T's columns of the kept tokens, stored apart from E


class ExportError(Exception):
    """A checkpoint or option the exporter cannot turn into a bundle; the message says why."""


@dataclass(frozen=True)
class Dims:
    """The sizes and flags the graphs are built from (a transformers BlenderbotSmallConfig + StarConfig)."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    vocab_size: int
    max_positions: int
    embed_scale: float
    layer_norm_eps: float
    use_star: bool
    gate_hidden: int
    refine_hidden: int
    strategy_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, model: StarForConditionalGeneration) -> Dims:
        cfg, star = model.config, model.star
        if cfg.activation_function != "gelu":
            raise ExportError(f"activation {cfg.activation_function!r} is not supported (BlenderBot-Small uses 'gelu')")
        for heads in (cfg.encoder_attention_heads, cfg.decoder_attention_heads):
            if cfg.d_model % heads:
                raise ExportError(f"d_model {cfg.d_model} is not divisible by {heads} heads")
        return cls(
            d_model=cfg.d_model,
            encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.decoder_layers,
            encoder_heads=cfg.encoder_attention_heads,
            decoder_heads=cfg.decoder_attention_heads,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
            embed_scale=float(model.base.model.encoder.embed_scale),
            layer_norm_eps=float(model.base.model.encoder.layernorm_embedding.eps),
            use_star=bool(model.star_config.use_star),
            gate_hidden=star.gate_fc1.out_features,
            refine_hidden=star.refine_fc1.out_features,
            strategy_token_ids=tuple(model.star_config.strategy_token_ids),
        )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


Matrices = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (W [in, out], bias [out])


def layout(model: StarForConditionalGeneration) -> tuple[dict[str, list[torch.nn.Linear]], dict[str, torch.Tensor]]:
    """Where every stored array comes from: (matrices, others).

    matrices: name -> the Linear layers that read the same input, concatenated along their outputs
    into one W [in, sum(out)] (module docstring); others: name -> a view of the parameter or buffer
    stored as it is (E^T, final_logits_bias[0], score_vec [d, 1], LayerNorms, positions). `collect`
    reads through this table and star_export.dequantize writes back through it, so the two never
    disagree about a name.
    """
    m = model.base.model
    enc, dec = m.encoder, m.decoder
    mats: dict[str, list[torch.nn.Linear]] = {}
    other: dict[str, torch.Tensor] = {
        EMBED_T: m.shared.weight.T,
        LM_BIAS: model.base.final_logits_bias[0],
        "enc.pos": enc.embed_positions.weight,
        "dec.pos": dec.embed_positions.weight,
    }

    def norm(name: str, ln: torch.nn.LayerNorm) -> None:
        other[name + ".gamma"], other[name + ".beta"] = ln.weight, ln.bias

    norm("enc.ln_emb", enc.layernorm_embedding)
    norm("dec.ln_emb", dec.layernorm_embedding)
    for i, layer in enumerate(enc.layers):
        a = layer.self_attn
        mats[f"enc.{i}.qkv"] = [a.q_proj, a.k_proj, a.v_proj]
        mats[f"enc.{i}.out"] = [a.out_proj]
        mats[f"enc.{i}.fc1"], mats[f"enc.{i}.fc2"] = [layer.fc1], [layer.fc2]
        norm(f"enc.{i}.ln1", layer.self_attn_layer_norm)
        norm(f"enc.{i}.ln2", layer.final_layer_norm)
    for i, layer in enumerate(dec.layers):
        a, x = layer.self_attn, layer.encoder_attn
        mats[f"dec.{i}.self_qkv"] = [a.q_proj, a.k_proj, a.v_proj]
        mats[f"dec.{i}.self_out"] = [a.out_proj]
        mats[f"dec.{i}.cross_q"] = [x.q_proj]
        mats[f"dec.{i}.cross_kv"] = [x.k_proj, x.v_proj]
        mats[f"dec.{i}.cross_out"] = [x.out_proj]
        mats[f"dec.{i}.fc1"], mats[f"dec.{i}.fc2"] = [layer.fc1], [layer.fc2]
        norm(f"dec.{i}.ln1", layer.self_attn_layer_norm)
        norm(f"dec.{i}.ln2", layer.encoder_attn_layer_norm)
        norm(f"dec.{i}.ln3", layer.final_layer_norm)
    if model.star_config.use_star:
        s = model.star
        mats["star.score"] = [s.score_proj]
        other["star.score_vec"] = s.score_vec[:, None]  # q [d, 1]
        mats["star.fc1"] = [s.gate_fc1, s.refine_fc1]
        mats["star.gate_fc2"], mats["star.refine_fc2"] = [s.gate_fc2], [s.refine_fc2]
    return mats, other


def collect(model: StarForConditionalGeneration) -> tuple[Matrices, dict[str, np.ndarray]]:
    """(matrices, others) in float32: name -> (W [in, out], bias), and name -> array (`layout`).

    A matrix's bias is stored apart under `name + ".bias"`: most are added by the op after the
    MatMul (MultiHeadAttention, BiasGelu, SkipLayerNormalization), at no extra cost.
    """
    layers, views = layout(model)
    mats = {name: (np.concatenate([_np(l.weight).T for l in group], axis=1),
                   np.concatenate([_np(l.bias) for l in group]))
            for name, group in layers.items()}
    return mats, {name: _np(view) for name, view in views.items()}


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8: W [K, N] -> (W_q int8 [K, N], s float32 [N]), W ~ W_q * s."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero column: any scale is exact
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


# MatMulNBits' CPU kernels compute 8-bit blocks of 16..256 correctly on every onnxruntime from 1.23.0
# to 1.32.0, and 512-blocks correctly only on 1.32.0 (1.23-1.26 return garbage, 1.27-1.31 refuse
# them): measured with K=1024, N=256 (benchmarks/platforms.py --ops, docs/platforms.md).
BLOCK_MAX = 256


def block_size(k: int) -> int:
    """The largest power of two <= BLOCK_MAX that divides K (MatMulNBits needs one, and >= 16)."""
    size = BLOCK_MAX
    while size >= 16 and k % size:
        size //= 2
    if size < 16:
        raise ExportError(f"int8 export needs layer widths divisible by 16; one is {k}")
    return size


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 8-bit layout: W [K, N] -> (uint8 [N, K/B, B], scales float32 [N, K/B]);
    W^T ~ (W_q - 128) * s, symmetric (MatMulNBits' default zero point for 8 bits is 128)."""
    k, n = w.shape
    size = block_size(k)
    blocks = np.ascontiguousarray(w.T).reshape(n, k // size, size)
    scale = np.abs(blocks).max(axis=2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scale


def runs_on_the_encoder(name: str) -> bool:
    """Matrices of the encoder graph (many rows per call): the DynamicQuantizeMatMul format."""
    return name.startswith("enc.") or name.endswith(".cross_kv")


def stored_arrays(model: StarForConditionalGeneration, precision: str,
                  output_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every array of the bundle's weights file, by name, in `precision`'s storage types.

    Matrices: `name` (W or W_q), `name.bias`, and for int8 `name.scale` (module docstring).
    output_ids: the tokens a trimmed LM head computes (increasing ids): its own matrix
    LM_WEIGHT = E^T[:, ids] [d, V_out] (as every matrix, per precision), LM_BIAS = b[ids] and the
    id table OUTPUT_IDS (int32); None: the head reads the shared embedding, all V rows.
    """
    mats, other = collect(model)
    if output_ids is not None:
        mats[LM_WEIGHT] = (other[EMBED_T][:, output_ids], other.pop(LM_BIAS)[output_ids])
    out: dict[str, np.ndarray] = {}
    float_type = np.float16 if precision == "float16" else np.float32
    for name, (w, b) in mats.items():
        if precision == "int8":
            quantize = quantize_int8 if runs_on_the_encoder(name) else quantize_blocks
            out[name], out[name + ".scale"] = quantize(w)
        else:
            out[name] = w.astype(float_type)
        out[LM_BIAS if name == LM_WEIGHT else name + ".bias"] = b.astype(float_type)
    if output_ids is not None:
        out[OUTPUT_IDS] = np.asarray(output_ids, np.int32)
    for name, a in other.items():
        if name == EMBED_T and precision == "int8":
            out[EMBED], out[EMBED_SCALE] = quantize_blocks(a)  # E^T [d, V] -> [V, d/B, B]: rows of E
        elif name == EMBED_T and output_ids is not None:  # the head has its own matrix: E's rows suffice
            out[EMBED] = np.ascontiguousarray(a.T).astype(float_type)
        else:
            out[name] = a.astype(float_type)
    return out
