"""What the LM head's 54,952-token output costs, and what keeping only the trained tokens would do.

    python benchmarks/lm_head.py --bundle star_runtime/data/default_bundle --limit 1000 --out-json lm.json

The output vocabulary is every token the tokenizer knows, but training only ever asks the model
to produce the tokens of its targets. This measures, on one bundle:

1. use: the distinct token ids of the training targets (ESConv's train split: the supporter
   responses of stage 1, every utterance of stage 0, and stage 0's chitchat corpus, each with
   __end__ and the strategy tokens), the kept set K, against the vocabulary V;
2. cost: the step graph's LM-head operator alone (int8: MatMulNBits with the bundle's own
   quantized embedding rows; float: MatMul), on all V rows against the K rows, median of many
   runs, beside the whole decoder step the runtime measures on the same machine;
3. quality: replies to the first --limit test contexts with the full head against the head
   restricted to K (logits outside K set to -1e9, which is what a trimmed head computes),
   greedy and with the paper's sampling (the same seed per context): the share of replies that
   are token-identical, and how many chosen tokens fell outside K with the full head.

Run it on a quiet machine: the timings are medians of one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from star_runtime import Runtime
from star_runtime.bundle import read_shared_tensors
from star_runtime.decoding import generate
from star_runtime.engine import DecodeRun
from star_runtime.sampling import DecodingOptions
from star_export.output_vocab import training_target_ids
from star_training.data import build_examples, load_conversations

OUTSIDE = -1e9  # finite, so the repetition penalty (x 1.03) and the finiteness check keep working


def kept_ids(runtime: Runtime, data: Path, corpora: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """The sorted token ids of every training target (module docstring, 1), with the strategy
    tokens, and per-source counts."""
    kept, counts = training_target_ids(runtime.tokenizer, data, corpora)
    return np.union1d(kept, runtime.engine.spec.strategy_token_ids), counts


def head_graph(runtime: Runtime, rows: np.ndarray) -> tuple[bytes, dict[str, np.ndarray]]:
    """A one-operator graph: the bundle's LM head over the embedding rows `rows`; and its input."""
    d = runtime.spec.d_model
    shared = read_shared_tensors(runtime.path, runtime.manifest)  # the embedding the graphs read
    if "embed.weight" in shared:  # int8: uint8 [V, d/B, B], scales [V, d/B]
        q, scale = shared["embed.weight"][rows], shared["embed.weight.scale"][rows].astype(np.float32)
        n, blocks, size = q.shape
        inits = [helper.make_tensor("W", TensorProto.UINT8, q.shape, q.tobytes(), raw=True),
                 helper.make_tensor("S", TensorProto.FLOAT, scale.shape, scale.tobytes(), raw=True)]
        node = helper.make_node("MatMulNBits", ["h", "W", "S"], ["y"], domain="com.microsoft",
                                K=blocks * size, N=n, bits=8, block_size=size, accuracy_level=4)
    else:
        w = np.ascontiguousarray(shared["embed.weight_t"][:, rows]).astype(np.float32)
        inits = [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True)]
        node = helper.make_node("MatMul", ["h", "W"], ["y"])
    graph = helper.make_graph([node], "lm_head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(rows)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), {"h": np.random.default_rng(0).standard_normal((1, d)).astype(np.float32)}


def time_head(runtime: Runtime, rows: np.ndarray, threads: int, repeats: int) -> float:
    """Median ms of one LM-head call over `rows`."""
    model, feed = head_graph(runtime, rows)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    for _ in range(50):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def replies(runtime: Runtime, contexts: list[tuple[int, ...]], options: DecodingOptions,
            mask: np.ndarray | None) -> tuple[list[list[int]], list[float]]:
    """Each context's reply (seed = its index) and the median step ms of each; `mask`: the ids
    outside K, whose logits are set to OUTSIDE after every step."""
    original = DecodeRun.step
    if mask is not None:
        def masked(self: DecodeRun, token_id: int) -> np.ndarray:
            logits = original(self, token_id)
            logits[mask] = OUTSIDE
            return logits

        DecodeRun.step = masked
    try:
        out, step_ms = [], []
        for i, ids in enumerate(contexts):
            g = generate(runtime.engine, ids, options, rng=np.random.default_rng(i))
            out.append(g.tokens)
            step_ms.append(statistics.median(g.timings.token_ms) if g.timings.token_ms else float("nan"))
        return out, step_ms
    finally:
        DecodeRun.step = original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped default)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/esconv")
    p.add_argument("--corpus", action="append", default=None, help="stage-0 corpora (default: chitchat, esconv-train)")
    p.add_argument("--limit", type=int, default=1000, help="test contexts for the quality part (0: skip it, for "
                   "a model of random weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--out-json", type=Path)
    args = p.parse_args(argv)

    rt = Runtime.load(args.bundle, threads=args.threads)
    spec = rt.engine.spec
    if spec.output_size != spec.vocab_size:
        print(f"lm_head.py: error: {args.bundle}'s LM head is already trimmed ({spec.output_size:,} of "
              f"{spec.vocab_size:,} tokens): measure an export of the whole head", file=sys.stderr)
        return 2
    kept, counts = kept_ids(rt, args.data, args.corpus or ["chitchat", "esconv-train"])
    outside = np.setdiff1d(np.arange(spec.vocab_size), kept)
    result = {"bundle": str(rt.path), "precision": spec.precision, "d_model": spec.d_model,
              "vocab": spec.vocab_size, "kept": len(kept), "distinct_target_ids": counts}
    print(f"{rt.path} ({spec.precision}, d {spec.d_model}): {len(kept):,} of {spec.vocab_size:,} ids are training "
          f"targets ({len(kept) / spec.vocab_size:.1%}); " + ", ".join(f"{k}: {v:,}" for k, v in counts.items()))

    full_ms = time_head(rt, np.arange(spec.vocab_size), args.threads, args.repeats)
    kept_ms = time_head(rt, kept, args.threads, args.repeats)
    result |= {"head_ms_full": full_ms, "head_ms_kept": kept_ms}
    print(f"LM head alone, median of {args.repeats}: {full_ms:.3f} ms on {spec.vocab_size:,} rows, "
          f"{kept_ms:.3f} ms on {len(kept):,} ({full_ms / kept_ms:.2f}x)")

    examples = build_examples(load_conversations(args.data, "test"), rt.tokenizer,
                              max_source=spec.max_source_length)[: args.limit]
    contexts = [e.input_ids for e in examples]
    for name, options in (("greedy", rt.options().greedy()), ("sampled", rt.options())) if contexts else ():
        full, step_ms = replies(rt, contexts, options, None)
        trimmed, _ = replies(rt, contexts, options, outside)
        same = sum(a == b for a, b in zip(full, trimmed))
        chosen_outside = sum(int(np.isin(r, outside).sum()) for r in full)
        tokens = sum(len(r) for r in full)
        step = statistics.median(step_ms)
        result[name] = {"contexts": len(contexts), "same_reply": same, "tokens": tokens,
                        "tokens_outside_kept": chosen_outside, "step_ms_median": step}
        print(f"{name}: {same} of {len(contexts)} replies token-identical ({same / len(contexts):.1%}); "
              f"{chosen_outside} of {tokens:,} tokens the full head chose are outside the kept set; "
              f"decoder step median {step:.3f} ms (the LM head is {full_ms / step:.0%} of it)")
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
