"""How close onnxruntime's kernels can bring a bundle to the floor: the work the floor counts,
done by those kernels, with everything else free.

    python benchmarks/kernel_bound.py BUNDLE [--repeats 30] [--threads N] [--floor-mb 512]

A reply is the encoder once and 1 + n decoder positions (benchmarks/floor.py, n = 40, a 160-token
context). The floor counts two kinds of work: the weight matmuls and attention. For each graph:

    mm      a second graph of only its weight matmuls (MatMul, MatMulNBits, DynamicQuantizeMatMul,
            Gemm, MatMulInteger whose second input is a weight: the same nodes, attributes and
            weights), each fed its own [1, rows, K] activation (rows: 160 for the encoder, 1 for a
            step), all bound once with IO binding, timed with the runtime's session options;
    attn    a graph of only its attention nodes (MultiHeadAttention, GroupQueryAttention: the
            same nodes and attributes), fed what they read in a reply: the encoder's q, k, v
            [1, 160, d]; a step's cross-attention query [1, 1, d] over the cached K, V
            [1, N, 160, H] of a 160-token source; its self-attention q|k|v [1, 1, 3d] (or q, k, v
            apart) over the cache [1, N, 41, H] holding t positions, averaged over t = 0..n.

LayerNorms, activations, the ops between kernels and Python are left out, so

    bound = E_mm + E_attn + (1 + n) (s_mm + s_attn)

is the least a reply of these kernels can take, and bound / floor the least distance to the floor
that onnxruntime's kernels allow on this machine. Measured in the same run: the whole graphs
(Engine.encode; DecodeRun.step over positions 0..n, as benchmarks/batch_step.py), their reply
E + (1 + n) s, and the floor (floor.measure and floor.estimate, for the bundle's configuration,
precision and LM head). Medians over --repeats; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402
from batch_step import CONTEXT, REPLY, reply_step_ms  # noqa: E402
from harness import median_ms, print_result  # noqa: E402

from star_runtime.bundle import contained, load_manifest, read_shared_tensors  # noqa: E402
from star_runtime.engine import Engine, session_options  # noqa: E402

MATMULS = {"MatMul", "MatMulNBits", "DynamicQuantizeMatMul", "Gemm", "MatMulInteger"}
ATTENTION = {"MultiHeadAttention", "GroupQueryAttention"}


def _inner_dim(node: onnx.NodeProto, weights: dict[str, tuple[int, ...]]) -> int | None:
    """K of a weight matmul (x [.., K] @ W [K, N]), or None when its second input is no weight."""
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "K")
    shape = weights.get(node.input[1])
    if shape is None or len(shape) != 2:
        return None
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return shape[1] if transposed else shape[0]


def _session(like: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[onnx.ValueInfoProto], weights: list[onnx.TensorProto],
             threads: int | None) -> ort.InferenceSession:
    """A session, with the runtime's options, for a graph of `nodes` cut from the model `like`
    (its opsets and IR version)."""
    model = helper.make_model(helper.make_graph(nodes, "part", inputs, outputs, weights),
                              opset_imports=like.opset_import)
    model.ir_version = like.ir_version
    return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def matmul_graph(model: onnx.ModelProto, shared: dict[str, np.ndarray],
                 rows: int) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[onnx.ValueInfoProto],
                                     list[onnx.TensorProto], list[int]]:
    """The weight matmuls of `model` as a graph of their own: node k reads input x{k} [1, rows, K_k]
    and writes y{k}; weights are the graph's initializers and the bundle's shared tensors (made
    initializers here, which lets onnxruntime prepack them: a lower bound still). Returns the
    nodes, inputs, outputs and weights, and each node's K."""
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {name: tuple(t.dims) for name, t in inits.items()} | {name: a.shape for name, a in shared.items()}
    nodes, inputs, outputs, used, dims = [], [], [], set(), []
    for node in model.graph.node:
        if node.op_type not in MATMULS:
            continue
        k_dim = _inner_dim(node, shapes)
        if k_dim is None:
            continue  # activation @ activation (attention): not a weight read
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        k = len(nodes)
        copy.input[0] = f"x{k}"
        for j in range(1, len(copy.input)):  # extra inputs that are computed (not weights) are dropped
            if copy.input[j] and copy.input[j] not in shapes:
                copy.input[j] = ""
        del copy.output[:]
        copy.output.append(f"y{k}")
        used.update(name for name in copy.input[1:] if name)
        inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, rows, k_dim]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
        nodes.append(copy)
        dims.append(k_dim)
    weights = [inits[name] for name in used if name in inits]
    weights += [onnx.numpy_helper.from_array(np.asarray(shared[name]), name) for name in used
                if name not in inits and name in shared]
    return nodes, inputs, outputs, weights, dims


def time_matmuls(model: onnx.ModelProto, shared: dict[str, np.ndarray], rows: int, threads: int | None,
                 repeats: int) -> dict[str, Any]:
    """ms per run of the matmul-only graph of `model` (its inputs and outputs bound once)."""
    *graph, dims = matmul_graph(model, shared, rows)
    session = _session(model, *graph, threads)
    rng = np.random.default_rng(0)
    io, values = session.io_binding(), []  # values: the bound inputs, kept alive while bound
    for k, k_dim in enumerate(dims):
        value = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, rows, k_dim), dtype=np.float32))
        io.bind_ortvalue_input(f"x{k}", value)
        values.append(value)
    for out in session.get_outputs():
        io.bind_output(out.name)  # allocated by the first run, then reused
    return {"nodes": len(dims), "ms": median_ms(lambda: session.run_with_iobinding(io), repeats)}


def _attention_feeds(node: onnx.NodeProto, inits: set[str], step: bool, heads: int, head_dim: int,
                     position: np.ndarray, total: np.ndarray) -> dict[int, np.ndarray]:
    """What attention `node` reads in a reply, by input slot (module docstring; d = heads x
    head_dim, the encoder's width too). `position` (int32 [1]) and `total` (int32 [], position + 1)
    are the step's, shared by its nodes and written in place before each run."""
    d, rng = heads * head_dim, np.random.default_rng(0)
    act = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    present = {j for j, name in enumerate(node.input) if name and name not in inits}
    if node.op_type == "MultiHeadAttention" and not step and present == {0, 1, 2}:
        return {j: act(1, CONTEXT, d) for j in present}
    if node.op_type == "MultiHeadAttention" and step and present <= {0, 1, 2, 4}:
        feeds = {0: act(1, 1, d), 1: act(1, heads, CONTEXT, head_dim), 2: act(1, heads, CONTEXT, head_dim)}
        return feeds | ({4: np.array([CONTEXT], np.int32)} if 4 in present else {})
    if node.op_type == "GroupQueryAttention" and step and present in ({0, 3, 4, 5, 6}, {0, 1, 2, 3, 4, 5, 6}):
        cache = lambda: act(1, heads, REPLY + 1, head_dim)  # noqa: E731
        qkv = {0: act(1, 1, 3 * d)} if 1 not in present else {j: act(1, 1, d) for j in (0, 1, 2)}  # packed or not
        return qkv | {3: cache(), 4: cache(), 5: position, 6: total}
    raise ValueError(f"{node.name}: a {node.op_type} reading inputs {sorted(present)} is not a layout this "
                     "benchmark knows (export/graphs.py changed?)")


def time_attention(model: onnx.ModelProto, step: bool, heads: int, head_dim: int, threads: int | None,
                   repeats: int) -> dict[str, Any]:
    """ms per run of the attention-only graph of `model` (a step's averaged over positions 0..REPLY)."""
    inits = {t.name: t for t in model.graph.initializer}
    position, total = np.zeros(1, np.int32), np.ones((), np.int32)
    named = {id(position): "position", id(total): "total"}  # one input each, read by every node
    nodes, inputs, outputs, arrays, used = [], [], [], {}, set()
    for node in model.graph.node:
        if node.op_type not in ATTENTION:
            continue
        feeds = _attention_feeds(node, set(inits), step, heads, head_dim, position, total)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        k = len(nodes)
        for j, array in feeds.items():
            name = named.get(id(array), f"a{k}_{j}")
            copy.input[j] = name
            if name not in arrays:
                arrays[name] = array
                dtype = TensorProto.INT32 if array.dtype == np.int32 else TensorProto.FLOAT
                inputs.append(helper.make_tensor_value_info(name, dtype, list(array.shape)))
        for j, name in enumerate(copy.output):
            copy.output[j] = f"o{k}_{j}"
            outputs.append(helper.make_tensor_value_info(copy.output[j], TensorProto.FLOAT, None))
        used.update(name for name in copy.input if name in inits)
        nodes.append(copy)
    session = _session(model, nodes, inputs, outputs, [inits[name] for name in used], threads)
    io = session.io_binding()
    for name, array in arrays.items():
        io.bind_cpu_input(name, array)  # the binding reads position and total in place
    for o in session.get_outputs():
        io.bind_output(o.name)
    if not step:
        return {"nodes": len(nodes), "ms": median_ms(lambda: session.run_with_iobinding(io), repeats)}

    def reply() -> None:
        for t in range(REPLY + 1):
            position[0], total[()] = t, t + 1
            session.run_with_iobinding(io)

    return {"nodes": len(nodes), "ms": median_ms(reply, repeats) / (REPLY + 1)}


def measure(bundle: Path, repeats: int, threads: int | None, floor_bytes: int) -> dict[str, Any]:
    manifest = load_manifest(bundle)
    engine = Engine.open(bundle, manifest, threads=threads)
    ids = np.random.default_rng(0).integers(10, engine.spec.vocab_size - 8, (1, CONTEXT))
    encoder_ms = median_ms(lambda: engine.encode(ids), repeats)
    step_ms = float(np.median([reply_step_ms(engine, ids) for _ in range(repeats)]))
    shared = read_shared_tensors(bundle, manifest)
    encoder, decoder = (onnx.load(str(contained(bundle, manifest["graphs"][role]))) for role in ("encoder", "step"))
    enc = time_matmuls(encoder, shared, CONTEXT, threads, repeats)
    step = time_matmuls(decoder, shared, 1, threads, repeats)
    spec = engine.spec
    enc_attn = time_attention(encoder, False, spec.decoder_heads, spec.head_dim, threads, repeats)
    step_attn = time_attention(decoder, True, spec.decoder_heads, spec.head_dim, threads, repeats)

    config = dict(manifest["model_config"], output_size=manifest["io"]["output_size"])
    threads_used = threads or session_options().intra_op_num_threads
    measured = floor.measure(threads_used, CONTEXT, config["d_model"], config["encoder_ffn_dim"], floor_bytes)
    est = floor.estimate(config, CONTEXT, REPLY, measured)[manifest["precision"]]
    reply = encoder_ms + (1 + REPLY) * step_ms
    matmuls = enc["ms"] + (1 + REPLY) * step["ms"]
    bound = matmuls + enc_attn["ms"] + (1 + REPLY) * step_attn["ms"]
    return {
        "bundle": str(bundle), "precision": manifest["precision"], "threads": threads_used,
        "graphs": {"encoder_ms": encoder_ms, "step_ms": step_ms, "reply_ms": reply},
        "matmuls": {"encoder_nodes": enc["nodes"], "encoder_ms": enc["ms"], "step_nodes": step["nodes"],
                    "step_ms": step["ms"], "reply_ms": matmuls},
        "attention": {"encoder_nodes": enc_attn["nodes"], "encoder_ms": enc_attn["ms"],
                      "step_nodes": step_attn["nodes"], "step_ms": step_attn["ms"]},
        "floor": {"encoder_ms": est["encoder_ms"], "position_ms": est["position_ms"], "reply_ms": est["reply_ms"],
                  "measured": measured},
        "bound": {"reply_ms": bound, "to_floor": bound / est["reply_ms"],
                  "matmuls_to_floor": matmuls / est["reply_ms"]},
        "reply_to_floor": reply / est["reply_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per part (default %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--floor-mb", type=int, default=512, help="bytes copied to measure bandwidth, in MiB "
                   "(default %(default)s: 16x a 32 MB L3)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.floor_mb < 1 or (args.threads is not None and args.threads < 1):
        p.error("--repeats, --floor-mb and --threads must be at least 1")
    return print_result("kernel_bound.py",
                        lambda: measure(args.bundle, args.repeats, args.threads, args.floor_mb * 2**20))


if __name__ == "__main__":
    sys.exit(main())
