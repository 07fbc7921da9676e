"""What every latency measurement shares: the trace of one reply, its timings, the statistics over
repeats, the machine description, and running one backend in a process of its own.

A backend's reply is traced as timestamps (seconds, `time.perf_counter`):

    start        the call begins (inputs are token ids, already on the device)
    strategy     the strategy is known (encoder + decoder position 0 + the strategy head)
    tokens[i]    response token i is known, i = 0 .. n-1 (n = the reply length, fixed)
    end          the call has returned

and turned into the four timings of a reply (milliseconds):

    strategy_ms    = strategy - start
    first_token_ms = tokens[0] - start
    per_token_ms   = (tokens[n-1] - tokens[0]) / (n - 1)          (n = 1: tokens[0] - strategy)
    reply_ms       = end - start

Peak RSS is the worker process's own high-water mark at its end: the interpreter, the libraries its
backend imports, the loaded model and the replies, so one process per backend (a shared process
would report the largest backend's peak for all of them).

The machine may be shared: `run_worker` reports the share of the CPU other processes used while
a worker ran, and `wait_for_quiet` waits until they use little (latency.py --max-other-cpu).

This file imports nothing heavy: the runtime's worker must not pay for torch.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from star_runtime.sampling import DecodingOptions

TIMINGS = ("strategy_ms", "first_token_ms", "per_token_ms", "reply_ms")
# The project's penalty (DecodingOptions'), also when greedy: every backend uses it.
REPETITION_PENALTY = DecodingOptions().repetition_penalty
LIBRARIES = ("star-esc", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "transformers", "optimum",
             "optimum-onnx", "ctranslate2")
WORKER = Path(__file__).with_name("backends.py")


class BenchmarkError(Exception):
    """A benchmark that could not finish (a worker crashed or timed out, an export failed);
    printed as one message, exit 1 (star_runtime.cli's rule)."""


class BenchmarkUsageError(BenchmarkError):
    """The command line or something it names is wrong; printed as one message, exit 2."""


@dataclass
class Trace:
    start: float
    strategy: float = float("nan")
    tokens: list[float] = field(default_factory=list)
    end: float = float("nan")

    def timings(self) -> dict[str, float]:
        """The four timings of this reply in ms (module docstring)."""
        n = len(self.tokens)
        if n == 0:
            raise BenchmarkError("a reply produced no response token")
        per_token = (self.tokens[-1] - self.tokens[0]) / (n - 1) if n > 1 else self.tokens[0] - self.strategy
        return {
            "strategy_ms": 1e3 * (self.strategy - self.start),
            "first_token_ms": 1e3 * (self.tokens[0] - self.start),
            "per_token_ms": 1e3 * per_token,
            "reply_ms": 1e3 * (self.end - self.start),
        }


def summarize(values: list[float]) -> dict[str, float]:
    """Median and 95th percentile (numpy's linear interpolation; with 10 repeats p95 lies between
    the largest two)."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95))}


def median_ms(fn: Any, repeats: int, warmup: int = 3) -> float:
    """The median of `repeats` timed calls of fn(), in ms, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def print_result(script: str, measure: Any) -> int:
    """Print measure()'s result as one JSON line and return 0; a bad bundle or value is one line
    on stderr, prefixed with the script's name, and the usage exit code."""
    from star_runtime import BundleError
    from star_runtime.cli import EXIT_USAGE

    try:
        result = measure()
    except (BundleError, ValueError) as err:
        print(f"{script}: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result))
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: VmHWM, the high-water mark of its own address
    space, on Linux. Not ru_maxrss there: Linux carries the parent's peak into a child across
    fork + exec, so every worker reported the benchmark process's 698 MB. Elsewhere ru_maxrss
    (bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def folder_bytes(path: Path) -> int:
    """Size on disk of a file, or of every file under a folder (apparent sizes)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The vector extensions that decide float32 and int8 matmul speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]


def library_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_description() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, library versions and the load average now."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory = psutil.virtual_memory().total
    except ImportError:
        physical, memory = None, None
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------------------------
# One backend, one process


@dataclass
class WorkerSpec:
    """Everything a worker process needs; travels as JSON on its stdin."""

    backend: str
    path: str  # checkpoint, optimum folder or bundle
    device: str
    threads: int
    warmup: int
    repeats: int
    reply_len: int
    input_ids: list[list[int]]  # [B, S], every position a real token
    special_ids: dict[str, int]  # pad, start, eos


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (/proc/stat; None elsewhere)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # user..softirq: not idle, iowait, steal


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def other_cpu_share_now(seconds: float = 2.0) -> float | None:
    """The share of the machine's CPU that processes other than this one use, over `seconds`."""
    busy, own, started = _busy_cpu_s(), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    after = _busy_cpu_s()
    if busy is None or after is None:
        return None
    other = after - busy - (time.process_time() - own)
    return min(1.0, max(0.0, other) / ((time.perf_counter() - started) * (os.cpu_count() or 1)))


def wait_for_quiet(max_share: float, timeout_s: float, log: Any) -> None:
    """Return once other processes use at most `max_share` of the CPU (or after `timeout_s`)."""
    deadline = time.perf_counter() + timeout_s
    while (share := other_cpu_share_now()) is not None and share > max_share:
        if time.perf_counter() > deadline:
            log(f"still {share:.0%} of the CPU busy after {timeout_s:.0f} s of waiting; going on")
            return
        log(f"waiting: other processes use {share:.0%} of the CPU")
        time.sleep(10)


def run_worker(spec: WorkerSpec, timeout_s: float) -> dict[str, Any]:
    """Run `backends.py` on `spec` in a fresh interpreter; its result, plus the process's wall time
    and `other_cpu_share`: the share of the machine's CPU time that OTHER processes used while it
    ran (0 on a quiet machine; 0.5 on 2 cores means another process held a whole core)."""
    busy, own, started = _busy_cpu_s(), _children_cpu_s(), time.perf_counter()
    result = run_json_script(WORKER, asdict(spec), spec.threads, timeout_s, spec.backend)
    wall = time.perf_counter() - started
    result["process_s"] = wall
    busy_after = _busy_cpu_s()
    other = None if busy is None or busy_after is None else busy_after - busy - (_children_cpu_s() - own)
    result["other_cpu_share"] = None if other is None else min(1.0, max(0.0, other) / (wall * (os.cpu_count() or 1)))
    return result


def run_json_script(script: Path, payload: dict[str, Any], threads: int, timeout_s: float,
                    label: str) -> dict[str, Any]:
    """`python script` with `payload` as JSON on stdin; returns the JSON object it prints last.

    The thread count is also set in the environment before the child starts, for the libraries
    that read it only at import (OpenMP, OpenBLAS, MKL). A failure is a BenchmarkError carrying
    the end of the child's stderr.
    """
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    try:
        proc = subprocess.run([sys.executable, str(script)], input=json.dumps(payload), capture_output=True,
                              text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{label}: no result within {timeout_s:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise BenchmarkError(f"{label} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])
