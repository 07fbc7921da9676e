"""The parts of a served reply, timed alone: what bounds star-serve's gain from batching.

    python benchmarks/batch_step.py BUNDLE [--rows 2,4,8,16] [--repeats 30] [--threads N]

For one bundle, in this process (nothing else should run):

    encoder_ms      the encoder on a 160-token context (benchmarks/latency.py's random tokens)
    safety_ms       SafetyPolicy.check_user on each of benchmarks/serve.py's user messages (the
                    check a served reply starts with), the mean
    step_ms[1]      one decoder step of one sequence (Engine.start + DecodeRun.step), the mean
                    over a reply's positions 0..40
    step_ms[R]      the same for R sequences at once (star_runtime.batching.DecodeBatch)

and the most a server on this machine can gain by decoding C = max(rows) conversations at once
over one at a time, when every reply takes n = 40 tokens and each conversation's encoder and
check run unbatched (docs/serve.md derives it):

    bound = C (E + S + n s_1) / (C (E + S) + n s_C)

Medians over --repeats (each step figure one reply's steps); one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median_ms, print_result  # noqa: E402
from serve import TURNS  # noqa: E402  the served conversations' user messages

from star_runtime import Runtime  # noqa: E402
from star_runtime.batching import DecodeBatch  # noqa: E402
from star_runtime.engine import Engine  # noqa: E402

CONTEXT, REPLY = 160, 40


def reply_step_ms(engine: Engine, ids: np.ndarray, rows: int = 1) -> float:
    """ms per step over one reply's positions 0..REPLY, `rows` sequences of context `ids` at once."""
    if rows == 1:
        run = engine.start(ids, capacity=REPLY + 1)
        step = lambda: run.step(5)  # noqa: E731
    else:
        batch = DecodeBatch(engine, rows)
        cross = engine.encode(ids)
        for _ in range(rows):
            batch.add(cross, ids.shape[1])
        tokens = dict.fromkeys(range(rows), 5)
        step = lambda: batch.step(tokens)  # noqa: E731
    start = time.perf_counter()
    for _ in range(REPLY + 1):
        step()
    return 1e3 * (time.perf_counter() - start) / (REPLY + 1)


def measure(bundle: Path, rows: list[int], repeats: int, threads: int | None) -> dict:
    rt = Runtime.load(bundle, threads=threads)
    engine = rt.engine
    ids = np.random.default_rng(0).integers(10, engine.spec.vocab_size - 8, (1, CONTEXT))
    out: dict = {"bundle": str(bundle), "encoder_ms": median_ms(lambda: engine.encode(ids), repeats)}
    messages = iter(range(1 << 30))  # a new text each call: the rules remember their verdict per text
    out["safety_ms"] = float(np.mean([median_ms(lambda m=m: rt.safety.check_user(f"{m} {next(messages)}"), repeats)
                                      for m in TURNS]))
    steps = {r: float(np.median([reply_step_ms(engine, ids, r) for _ in range(repeats)])) for r in [1, *rows]}
    out["step_ms"] = steps
    e_s, c = out["encoder_ms"] + out["safety_ms"], max(rows)
    out["bound"] = {"clients": c, "gain": c * (e_s + REPLY * steps[1]) / (c * e_s + REPLY * steps[c])}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--rows", default="2,4,8,16", help="batch sizes, comma-separated (default %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls or replies per part (default %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:
        rows = sorted({int(r) for r in args.rows.split(",")})
        if not rows or rows[0] < 2 or args.repeats < 1:
            raise ValueError
    except ValueError:
        p.error(f"--rows: batch sizes of 2 or more, comma-separated, and --repeats >= 1, not {args.rows!r}")
    return print_result("batch_step.py", lambda: measure(args.bundle, rows, args.repeats, args.threads))


if __name__ == "__main__":
    sys.exit(main())
