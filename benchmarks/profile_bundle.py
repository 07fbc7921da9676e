"""Where a bundle's time and memory go: latency, peak RSS and onnxruntime's per-op profile.

    python benchmarks/profile_bundle.py BUNDLE [BUNDLE ...] [--eager CKPT] [--reps 5] [--profile]
                                        [--threads N] [--device cpu|cuda]

Each bundle (and the eager PyTorch baseline, with --eager) runs in its own process, so its peak
RSS (VmHWM via harness.peak_rss_bytes, after loading and decoding) is its own. The workload is the issues':
a 160-token context, a 40-token greedy reply with __end__ banned (fixed length), batch 1.
Reported: min and median over --reps of the whole reply, the encoder, decoder position 0 (the
strategy) and the mean time per response token. --profile adds the kernel time per part of the
step graph (node-name scopes from export/graphs.py: dec.{i}.self_attn, star, lm_head, ...),
and STAR's share of a response step. The full comparison with optimum is benchmarks/latency.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

from harness import peak_rss_bytes  # benchmarks/ is this script's folder, first on sys.path

CONTEXT, NEW_TOKENS = 160, 40


def _context(vocab_size: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(4, vocab_size - 8, size=CONTEXT).tolist()


def _summary(rows: list[tuple[float, float, float, float]]) -> dict:
    rows = sorted(rows)
    med = rows[len(rows) // 2]
    return {"min_ms": round(rows[0][0], 1), "median_ms": round(med[0], 1), "encoder_ms": round(med[1], 1),
            "strategy_step_ms": round(med[2], 2), "per_token_ms": round(med[3], 2)}


def measure_bundle(path: str, reps: int, threads: int | None, profile: bool, device: str = "cpu") -> dict:
    from star_runtime.bundle import load_manifest
    from star_runtime.decoding import generate
    from star_runtime.engine import Engine
    from star_runtime.sampling import DecodingOptions

    manifest = load_manifest(path, verify=False)
    prefix = os.path.join(tempfile.mkdtemp(), "ort") if profile else None
    engine = Engine.open(path, manifest, device=device, threads=threads, profile_prefix=prefix)
    ids, greedy = _context(manifest["io"]["vocab_size"]), DecodingOptions(do_sample=False, max_new_tokens=NEW_TOKENS)
    rows = []
    for i in range(reps + 1):  # the first run warms up
        t = generate(engine, ids, greedy, stop_at_eos=False).timings
        if i:
            rows.append((t.total_ms, t.encoder_ms, t.strategy_ms - t.encoder_ms, t.per_token_ms))
    out = {"bundle": path, "precision": manifest["precision"], "device": device, **_summary(rows),
           "peak_rss_mb": round(peak_rss_bytes() / 2**20),
           "bundle_mb": round(sum(f["size"] for f in manifest["files"].values()) / 1e6, 1)}
    if profile:
        out["step_profile"] = _profile(engine.step.end_profiling())
        out["encoder_profile"] = _profile(engine.encoder.end_profiling())
    return out


def _profile(path: str) -> dict:
    """Kernel time per run (ms), by node scope and by op type, from onnxruntime's JSON trace."""
    events = json.load(open(path))
    runs = sum(1 for e in events if e.get("name") == "model_run") or 1
    run_ms = sum(e["dur"] for e in events if e.get("name") == "model_run") / runs / 1e3
    scopes, ops = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time").split(" ")[-1]  # "fused star/Gemm_3" -> "star/Gemm_3"
            scope = node.split("/")[0] if "/" in node else "(unscoped)"
            scope = scope.split(".")[0] + ".*." + scope.split(".")[-1] if scope.startswith(("dec.", "enc.")) else scope
            scopes[scope] += e["dur"] / runs / 1e3
            ops[e["args"]["op_name"]] += e["dur"] / runs / 1e3
    kernels = sum(scopes.values())
    return {"run_ms": round(run_ms, 3), "kernel_ms": round(kernels, 3),
            "by_scope_ms": {k: round(v, 3) for k, v in scopes.most_common()},
            "by_op_ms": {k: round(v, 3) for k, v in ops.most_common(10)},
            "star_share_of_run": round(scopes.get("star", 0.0) / run_ms, 4) if run_ms else None}


def measure_eager(ckpt: str, reps: int, threads: int | None) -> dict:
    import torch

    from star_training.checkpoint import load_model
    from star_training.generate import generate

    if threads:
        torch.set_num_threads(threads)
    model = load_model(ckpt).eval()
    ids = torch.tensor([_context(model.config.vocab_size)])
    mask = torch.ones_like(ids)
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        generate(model, ids, mask, do_sample=False, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"eager": ckpt, "min_ms": round(times[0], 1), "median_ms": round(times[len(times) // 2], 1),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="*")
    p.add_argument("--eager", metavar="CKPT", help="also time training/generate.py on this checkpoint")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    p.add_argument("--profile", action="store_true", help="onnxruntime per-op profile of each bundle")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the bundles run")
    p.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, path = args.child
        result = (measure_eager(path, args.reps, args.threads) if kind == "eager"
                  else measure_bundle(path, args.reps, args.threads, args.profile, args.device))
        print(json.dumps(result))
        return 0
    jobs = [("bundle", b) for b in args.bundles] + ([("eager", args.eager)] if args.eager else [])
    if not jobs:
        p.error("give at least one bundle or --eager CKPT")
    for kind, path in jobs:
        cmd = [sys.executable, __file__, "--child", kind, path, "--reps", str(args.reps)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--profile"] if args.profile else []
        cmd += ["--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            from star_runtime.cli import EXIT_FAILURE  # here, not at the top: the children measure RSS

            print(f"{path}: failed\n{done.stderr}", file=sys.stderr)
            return EXIT_FAILURE
        print(done.stdout.strip().splitlines()[-1])  # one JSON object per line
    return 0


if __name__ == "__main__":
    sys.exit(main())
