"""The golden self-check: does this platform compute what the exporter's onnxruntime computed?

star-export runs the finished bundle on its own onnxruntime (after star_export.validate compared
that run with the PyTorch model) for one fixed context and stores, in manifest["selfcheck"]:

    context_ids       the fixed context, about 20 ids
    strategy_logits   [8]: W_s h_0 + b_s at position 0 (__start__)
    steps[t]          t = 1..T (T = STEPS): token = the greedy token at t (argmax of the logits over the
                      ids a response may hold), ids = 64 probed vocabulary ids (the 8 largest
                      logits and 56 spread over the LM head's outputs), logits = their values
    onnxruntime, provider, machine   where the values were computed (for the refusal message)

`Runtime.load` runs the same context (teacher-forced with the golden tokens, so every step
compares like with like: one encoder run and T + 1 decoder steps, a few ms) and refuses the bundle with a
BundleError when

    d = max |logit - golden| over the strategy logits and every step's probed ids  > TOLERANCE[precision]
    or a logit is NaN or infinite
    or the greedy choice (strategy, or token at t) differs where golden's top-2 margin > 2 x tolerance

(where the margin is at most 2 x tolerance, two platforms within tolerance may rightly choose
differently). The reference is the exporter's onnxruntime, not PyTorch: an int8 bundle differs
from its float model by quantization error (max |logit difference| 0.17 on the shipped default,
export/validate.py), a bound so loose that a platform computing slightly wrong would pass; the
chain PyTorch -> (validate) -> exporter's onnxruntime -> (this check) -> platform keeps each
comparison tight. About 2 KB of JSON.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import onnxruntime as ort

from star_runtime.decoding import Decoder, Run, banned_ids
from star_runtime.engine import Engine
from star_runtime.manifest import BundleError

# One response step (strategy + first token: 3 onnxruntime runs). Each run of the default bundle
# costs about 1 ms on the 2-core dev machine, a load about 100 ms: 2 steps made the check 4-6% of
# a load, 1 step 3%.
STEPS = 1
TOP = 8  # probed ids per step: the largest logits (so a step's top-2 margin is known) ...
SPREAD = 56  # ... and ids spread over the vocabulary (a kernel that zeroes or scrambles a block shows there)
# max |logit difference| allowed, by precision, against golden values from onnxruntime 1.32.0 on
# x86_64 (docs/platforms.md, the default bundle and its float32 export, every release 1.22.0-1.32.0):
#   float32: at most 5.6e-6 (1.22-1.29; 4.6e-7 from 1.30 on): 1e-3 leaves 180x.
#   int8:    at most 1.3e-2 (format 2), 2.4e-2 (format 3's step graph) and 2.0e-2 (format 4's: the
#            default's checkpoint and a random 90M one re-exported, on 1.22, 1.26 and 1.29) on
#            1.22-1.29, other int8
#            kernels; 4.7e-7 from 1.30 on; 1.0e-2 on aarch64 under qemu (format 2): 0.1 leaves 4x,
#            and a platform computing wrong is far outside (the old 512-blocks on 1.23-1.26: 8.4
#            and more, or NaN).
#   float16: not measured on CUDA here (no GPU); export/validate.py measured 2.4e-3 of logits up to 7
#            against PyTorch on the CPU, so the int8 limit is used.
TOLERANCE = {"float32": 1e-3, "int8": 0.1, "float16": 0.1}


def _banned(engine: Decoder) -> np.ndarray:
    """The logits never chosen (a fixed-length reply: __end__ neither)."""
    return engine.to_output(banned_ids(engine.spec, with_eos=True))


def _steps(engine: Decoder, context_ids: list[int], strategy_token: int | None, tokens: list[int] | None,
           steps: int) -> tuple[np.ndarray, list[np.ndarray], list[int], int]:
    """Strategy logits [8], each step's logits [V_out] (copies), the fed tokens, the strategy token.

    strategy_token/tokens None: choose greedily (the exporter); else feed them (the check).
    """
    run = engine.start(np.asarray([context_ids], dtype=np.int64), capacity=steps + 1)
    try:
        return _feed(engine, run, strategy_token, tokens, steps)
    finally:
        run.close()


def _feed(engine: Decoder, run: Run, strategy_token: int | None, tokens: list[int] | None,
          steps: int) -> tuple[np.ndarray, list[np.ndarray], list[int], int]:
    sids, banned = engine.spec.strategy_token_ids, _banned(engine)
    run.step(engine.spec.bos_id)
    strategy_logits = np.asarray(engine.strategy_logits(run.hidden), dtype=np.float64)
    token = sids[int(strategy_logits.argmax())] if strategy_token is None else strategy_token
    first, fed, all_logits = token, [], []
    for t in range(steps):
        logits = run.step(token).astype(np.float64)  # a copy: the run's buffer is overwritten next step
        all_logits.append(logits)
        if tokens is None:
            masked = logits.copy()
            masked[banned] = -np.inf
            token = int(engine.output_ids[masked.argmax()])
        else:
            token = tokens[t]
        fed.append(token)
    return strategy_logits, all_logits, fed, first


def platform_name(engine: Engine) -> dict[str, str]:
    """onnxruntime version, execution provider and CPU architecture of this process."""
    return {"onnxruntime": ort.__version__, "provider": engine.step.get_providers()[0],
            "machine": platform.machine()}


def golden(engine: Engine, context_ids: list[int], steps: int = STEPS) -> dict[str, Any]:
    """The record star-export stores in manifest["selfcheck"] (module docstring)."""
    strategy_logits, all_logits, tokens, _ = _steps(engine, context_ids, None, None, steps)
    spread = np.linspace(0, engine.spec.output_size - 1, SPREAD).astype(np.int64)  # logit indices
    banned = _banned(engine)
    records = []
    for logits, token in zip(all_logits, tokens):
        masked = logits.copy()
        masked[banned] = -np.inf
        top = np.argsort(-masked, kind="stable")[:TOP]
        probes = list(dict.fromkeys([*map(int, top), *map(int, spread)]))
        records.append({"token": token, "ids": [int(engine.output_ids[k]) for k in probes],
                        "logits": [_short(logits[k]) for k in probes]})
    return {"context_ids": list(map(int, context_ids)),
            "strategy_logits": [_short(v) for v in strategy_logits],
            "steps": records, **platform_name(engine)}


def _short(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (0.12345679, not 0.12345679104328156)."""
    return float(str(np.float32(value)))


def decisive_steps(record: dict[str, Any], tolerance: float) -> int:
    """How many of the record's greedy choices (strategy included) have a top-2 margin > 2 x tolerance."""
    margins = [_margin(record["strategy_logits"])] + [_margin(s["logits"][:TOP]) for s in record["steps"]]
    return sum(m > 2 * tolerance for m in margins)


def _margin(values: list[float]) -> float:
    top = sorted(values, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def measure(engine: Decoder, manifest: dict[str, Any]) -> tuple[float, list[str]]:
    """Run the golden context on this platform: (d, the greedy choices that differ) (module docstring).
    `engine` may be a batching.StepBatcher: its rows are computed by other kernels (two rows)."""
    record = manifest["selfcheck"]
    tolerance = TOLERANCE[manifest["precision"]]
    sids = engine.spec.strategy_token_ids
    golden_strategy = int(np.argmax(record["strategy_logits"]))
    steps = record["steps"]
    strategy_logits, all_logits, _, _ = _steps(engine, record["context_ids"], sids[golden_strategy],
                                               [s["token"] for s in steps], len(steps))
    diffs = [np.abs(strategy_logits - np.asarray(record["strategy_logits"]))]
    problems = []
    if _margin(record["strategy_logits"]) > 2 * tolerance and int(strategy_logits.argmax()) != golden_strategy:
        problems.append("the strategy differs")
    banned = _banned(engine)
    for t, (logits, step) in enumerate(zip(all_logits, steps), start=1):
        if not np.isfinite(logits).all():
            problems.append(f"NaN or infinite logits at step {t}")
            diffs.append(np.array([np.inf]))
            continue
        probes = engine.to_output(np.asarray(step["ids"], np.int64))
        if probes.size != len(step["ids"]):
            problems.append(f"step {t} probes tokens the LM head has no logit for")
            diffs.append(np.array([np.inf]))
            continue
        diffs.append(np.abs(logits[probes] - np.asarray(step["logits"])))
        masked = logits.copy()
        masked[banned] = -np.inf
        greedy = int(engine.output_ids[masked.argmax()])
        if _margin(step["logits"][:TOP]) > 2 * tolerance and greedy != step["token"]:
            problems.append(f"the greedy token differs at step {t}")
    worst = float(np.max(np.concatenate(diffs)))
    return (worst if np.isfinite(worst) else float("inf")), problems


def run_selfcheck(engine: Engine, manifest: dict[str, Any], where: str = "bundle",
                  decoder: Decoder | None = None) -> float:
    """`measure` (of `decoder`, default the engine itself), and a one-line BundleError beyond
    tolerance (module docstring); returns d."""
    try:
        worst, problems = measure(decoder or engine, manifest)
    except Exception as err:  # onnxruntime's run errors share no base class
        if isinstance(err, MemoryError):
            raise
        here = platform_name(engine)
        reason = " ".join(str(err).split())[:300]
        raise BundleError(f"{where}: the self-check failed: onnxruntime {here['onnxruntime']} ({here['provider']}, "
                          f"{here['machine']}) cannot run this bundle: {reason}") from None
    tolerance = TOLERANCE[manifest["precision"]]
    if worst > tolerance or problems:
        record, here = manifest["selfcheck"], platform_name(engine)
        raise BundleError(
            f"{where}: the self-check failed: this platform computes something else than the exporter did "
            f"(onnxruntime {here['onnxruntime']}, {here['provider']}, {here['machine']}): max |logit difference| "
            f"{worst:.2e} (tolerance {tolerance:.0e} for {manifest['precision']})"
            + "".join(f", {p}" for p in problems)
            + f"; the bundle's values come from onnxruntime {record['onnxruntime']} on {record['machine']}. Use "
            "that onnxruntime release (docs/platforms.md lists the ones that pass), or load with verify=False "
            "to skip this check at your own risk")
    return worst
