"""How fast a reply could possibly be on this machine: the floor the measured backends are held to.

A reply is the encoder once, then 1 + n decoder positions (n = reply length; position 0 gives the
strategy). At batch 1 a decoder position is a chain of matrix-vector products: it reads every
decoder weight once and does 2 flops per weight read, so it is bound by memory bandwidth; the
encoder multiplies S x d activations by the same kind of matrices, so it is bound by matmul
throughput. With d = d_model, f = ffn width, L = layers, V = vocabulary, S = context length:

    decoder weights read per position (elements)
        = L_dec (4 d^2 + 2 d^2 + 2 d f)        self-attention q,k,v,o; cross-attention q,o; FFN
          + 5 d^2                               STAR: score, gate (2 layers), refiner (2 layers), widths d
          + V d                                 LM head (the tied embedding)
    cache read per position (elements)
        = L_dec 2 S d                           cross-attention K, V (computed once per turn)
          + L_dec 2 t d                         self-attention K, V, t = (n + 2) / 2 positions on average
    encoder flops
        = L_enc (2 S (4 d^2 + 2 d f) + 4 S^2 d)  projections, FFN, attention scores and weighted sum
          + L_dec 2 S 2 d^2                      the cross-attention K, V of every decoder layer

    position_ms = max(bytes per position / bandwidth, 2 weights / matmul throughput)
    floor       = encoder flops / matmul throughput + (1 + n) position_ms

Bytes per weight: 4 in float32; 1 in int8, plus a 4-byte scale per output column (the bundle's
dynamic int8 MatMuls); the caches are float32. Biases and LayerNorms (0.1% of the bytes) are left
out, which keeps the floor a lower bound.

Measured here (`measure`, with the benchmark's thread count), best of a few tries each:
- bandwidth: multi-threaded numpy copies (read + write counted) and sums over 512 MB, 16x the
  dev machine's 32 MB L3; the larger of the two;
- float32 throughput: numpy's BLAS on [S, d] @ [d, f], the encoder's FFN shape;
- int8 throughput: onnxruntime's MatMulInteger (uint8 x int8 -> int32, the integer core of the
  int8 bundle's DynamicQuantizeMatMul) on the same shape; numpy has no integer BLAS.

    python benchmarks/floor.py < {"threads": 2, "s": 160, "d": 512, "f": 2048}   ->  one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

BANDWIDTH_BYTES = 512 * 2**20


def _best_seconds(fn: Any, repeats: int) -> float:
    fn()  # thread pools and caches warm
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> dict[str, float]:
    """Bytes per second of a copy (read + write counted) and of a sum (read only) over `nbytes`,
    `threads` threads each on its own slice (numpy releases the GIL in both)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    slices = [slice(i * src.size // threads, (i + 1) * src.size // threads) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        copy_s = _best_seconds(lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices)), repeats)
        sum_s = _best_seconds(lambda: list(pool.map(lambda s: np.add.reduce(src[s]), slices)), repeats)
    return {"copy_bytes_per_s": 2 * src.nbytes / copy_s, "read_bytes_per_s": src.nbytes / sum_s}


def float32_matmul_throughput(s: int, d: int, f: int, repeats: int = 10) -> float:
    """Flops per second of numpy's float32 [s, d] @ [d, f] (BLAS, its own threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((s, d), dtype=np.float32)
    b = rng.standard_normal((d, f), dtype=np.float32)
    return 2 * s * d * f / _best_seconds(lambda: a @ b, repeats)


def int8_matmul_throughput(s: int, d: int, f: int, threads: int, repeats: int = 10) -> float:
    """Integer ops per second of onnxruntime's MatMulInteger, uint8 [s, d] @ int8 [d, f]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (d, f), dtype=np.int8), "w")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "matmul_integer",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [s, d])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [s, f])], initializer=[w])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.integers(0, 256, (s, d), dtype=np.uint8)}
    return 2 * s * d * f / _best_seconds(lambda: session.run(None, feed), repeats)


def measure(threads: int, s: int, d: int, f: int, nbytes: int = BANDWIDTH_BYTES) -> dict[str, Any]:
    bandwidth = memory_bandwidth(threads, nbytes)
    return {**bandwidth, "bandwidth_bytes_per_s": max(bandwidth.values()),
            "float32_ops_per_s": float32_matmul_throughput(s, d, f),
            "int8_ops_per_s": int8_matmul_throughput(s, d, f, threads), "matmul_shape": [s, d, f]}


def estimate(config: dict[str, int], context_len: int, reply_len: int, measured: dict[str, Any]) -> dict[str, Any]:
    """The floor of a reply in float32 and int8 (module docstring); `config` holds the model's
    d_model, *_layers, *_ffn_dim and vocab_size, and output_size where the LM head is trimmed."""
    d, f_dec, f_enc = config["d_model"], config["decoder_ffn_dim"], config["encoder_ffn_dim"]
    l_enc, l_dec = config["encoder_layers"], config["decoder_layers"]
    v = config.get("output_size", config["vocab_size"])  # the LM head's rows
    s, n = context_len, reply_len
    matrices = l_dec * (6 * d * d + 2 * d * f_dec) + 5 * d * d + v * d  # weights read per position
    columns = l_dec * (6 * d + f_dec + d) + 5 * d + v  # output columns of those matrices (int8 scales)
    cache = l_dec * 2 * s * d + l_dec * 2 * ((n + 2) / 2) * d
    encoder_flops = l_enc * (2 * s * (4 * d * d + 2 * d * f_enc) + 4 * s * s * d) + l_dec * 2 * s * 2 * d * d
    out: dict[str, Any] = {"encoder_flops": encoder_flops, "decoder_weights_per_position": matrices}
    for precision, weight_bytes in (("float32", 4 * matrices), ("int8", matrices + 4 * columns)):
        throughput = measured[f"{precision}_ops_per_s"]
        position_bytes = weight_bytes + 4 * cache
        encoder_ms = 1e3 * encoder_flops / throughput
        position_ms = 1e3 * max(position_bytes / measured["bandwidth_bytes_per_s"], 2 * matrices / throughput)
        out[precision] = {
            "bytes_per_position": position_bytes,
            "encoder_ms": encoder_ms,
            "position_ms": position_ms,
            "strategy_ms": encoder_ms + position_ms,
            "first_token_ms": encoder_ms + 2 * position_ms,
            "per_token_ms": position_ms,
            "reply_ms": encoder_ms + (1 + n) * position_ms,
        }
    return out


def main() -> int:
    spec = json.load(sys.stdin)
    print(json.dumps(measure(spec["threads"], spec["s"], spec["d"], spec["f"], spec.get("bytes", BANDWIDTH_BYTES))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
