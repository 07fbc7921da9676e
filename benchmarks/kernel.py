"""Fused STAR kernel vs eager PyTorch vs torch.compile, against the card's floor.

    python benchmarks/kernel.py [--batches 128,16,1] [--time 41] [--d 512]
                                [--precisions bf16,fp32,tf32] [--tiles 64x64x3] [--json PATH]

Modes: "fwd" (inference forward over [B, T, d]), "fwd+bwd" (training step of the module: forward,
then backward into h and every weight), "step" (one decoding position with the streaming state).
Providers: "fused" (StarModule(backend="triton"): kernels/star_triton.py), "eager"
(StarModule(backend="torch"): kernels/reference.py), "compile" (torch.compile of the eager module),
and with --graphs "eager graphed" and "fused graphed" (fwd and fwd+bwd: a copy of the module
whose call replays CUDA graphs made by torch.cuda.make_graphed_callables, so the host's launch
work is gone and the time is the GPU's; the ratio to "eager" says what CUDA graphs in the
caller would buy, the ratio between the two what the kernels buy once neither is host-bound).

Defaults put the headline first (bf16, fwd+bwd, batch 128), and the JSON is rewritten after
every shape, so a run cut short keeps what it measured.

The floor is the larger of
    bytes / measured bandwidth     bytes: h in and h' out (plus dy in and dh out for the backward,
                                   the state in and out for a step), the weights once (and their
                                   gradients once); bandwidth: a 1 GiB device-to-device copy
    FLOPs / measured matmul rate   FLOPs: the five d x d products per position, 2 d^2 each
                                   (three times that with the backward: dX and dW); rate: an
                                   8192^3 matmul in the same precision
and the table says which binds. Times are medians of triton.testing.do_bench (CUDA events,
L2 flushed before each call); "host ms" is the median time the host takes to issue one call with
the GPU idle (perf_counter around the call, synchronised before it): where it is close to "ms",
the call is host-bound. "err" is the largest relative error (||x - ref|| / ||ref||) of h' (and,
with the backward, dL/dh and every weight gradient) against the eager module in float32 on the
same rounded weights and inputs. Without a CUDA GPU the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

PRECISIONS = {  # name: (dtype name, torch.set_float32_matmul_precision)
    "fp32": ("float32", "highest"),
    "tf32": ("float32", "high"),
    "bf16": ("bfloat16", "highest"),
}


@dataclass
class Row:
    precision: str
    mode: str
    batch: int
    time: int
    provider: str
    ms: float
    gbps: float  # floor bytes / time
    tflops: float  # floor FLOPs / time
    vs_eager: float  # eager time / this time
    vs_floor: float  # this time / floor
    host_ms: float  # median host time to issue one call, GPU idle
    err: float  # largest relative error against the float32 eager reference
    memory_floor_ms: float  # floor bytes / measured copy bandwidth
    compute_floor_ms: float  # floor FLOPs / measured matmul rate
    bound: str  # the larger floor: "memory" or "compute"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="128,16,1", help="comma-separated batch sizes (default 128,16,1)")
    p.add_argument("--time", type=int, default=41, help="decoder positions for fwd and fwd+bwd (default 41)")
    p.add_argument("--d", type=int, default=512, help="model width (default 512)")
    p.add_argument("--precisions", default="bf16,fp32,tf32", help=f"comma-separated, from {','.join(PRECISIONS)}")
    p.add_argument("--modes", default="fwd+bwd,fwd,step", help="comma-separated, from fwd,fwd+bwd,step")
    p.add_argument("--compile-batches", default="128",
                   help="batch sizes that also time torch.compile (each compiles anew: ~10 s); 'none' for none")
    p.add_argument("--min-block-m", default="",
                   help="extra fused rows with the smallest row block (star_triton.LaunchSettings' "
                        "min_block_m and min_step_block_m) set to each value (a tuning sweep)")
    p.add_argument("--tiles", default="",
                   help="extra fused rows with star_triton.LaunchSettings' tiles set to each BLOCK_NxBLOCK_KxSTAGES, "
                        "comma-separated (a tuning sweep), e.g. 64x64x3")
    p.add_argument("--graphs", action="store_true",
                   help="also time eager and fused fwd and fwd+bwd replayed from CUDA graphs")
    p.add_argument("--profile", action="store_true",
                   help="also list the GPU kernels of one fused and one eager fwd+bwd "
                        "(first precision, largest batch)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    def ints(text: str, name: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name} takes comma-separated integers, got {text!r}")
        if any(v < 1 for v in values):
            p.error(f"--{name} values must be positive, got {text!r}")
        return values

    args.batches = ints(args.batches, "batches")
    args.compile_batches = [] if args.compile_batches == "none" else ints(args.compile_batches, "compile-batches")
    args.min_block_m = ints(args.min_block_m, "min-block-m")
    text, bad_tiles = args.tiles, f"--tiles takes BLOCK_NxBLOCK_KxSTAGES values such as 64x64x3, got {args.tiles!r}"
    try:
        args.tiles = [tuple(int(v) for v in t.split("x")) for t in text.split(",") if t.strip()]
    except ValueError:
        p.error(bad_tiles)
    if any(len(t) != 3 or min(t) < 1 for t in args.tiles):
        p.error(bad_tiles)
    args.precisions = [x for x in args.precisions.split(",") if x]
    args.modes = [x for x in args.modes.split(",") if x]
    if bad := [x for x in args.precisions if x not in PRECISIONS]:
        p.error(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    if bad := [x for x in args.modes if x not in ("fwd", "fwd+bwd", "step")]:
        p.error(f"unknown mode {bad[0]!r}; choose from fwd, fwd+bwd, step")
    if args.time < 1 or args.d < 16 or not args.batches:
        p.error("--time must be >= 1, --d >= 16 and --batches non-empty")
    return args


def measure_ceilings(torch, do_bench, precisions: list[str]) -> dict:
    """Copy bandwidth (bytes read + written) and matmul rate per precision, on random data."""
    n = 1 << 28  # 1 GiB of float32: far past the 50-60 MB L2
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    out = {"bandwidth_gbps": 2 * n * 4 / copy_ms / 1e6}
    del src, dst
    for name in precisions:
        dtype, mm_precision = PRECISIONS[name]
        a = torch.randn(8192, 8192, device="cuda").to(getattr(torch, dtype))
        b = torch.randn(8192, 8192, device="cuda").to(getattr(torch, dtype))
        with matmul_precision(torch, mm_precision):
            out[f"matmul_tflops_{name}"] = 2 * 8192**3 / do_bench(lambda: a @ b, return_mode="median") / 1e9
    return out


def work(mode: str, B: int, T: int, d: int, elem: int) -> tuple[float, float]:
    """(bytes, FLOPs) of the floor for one call (gate_hidden = refine_hidden = d)."""
    weights = (5 * d * d + 6 * d) * elem  # W_a, W_g1, W_g2, W_p1, W_p2, five biases and q
    if mode == "step":
        return 2 * B * d * elem + 2 * (B * d + 2 * B) * 4 + weights, 10 * B * d * d
    M = B * T
    if mode == "fwd":
        return 2 * M * d * elem + weights, 10 * M * d * d
    return 4 * M * d * elem + 2 * weights, 30 * M * d * d


# The script flags a provider whose relative error against the float32 reference is over both
# the correctness tests' tolerance (tests/test_kernel.py; TF32 products chained up to four deep
# were under 2e-3 there) and twice eager's own error on the same inputs. The tests pick weights
# and a positive dy that keep every gradient well conditioned; here dy has both signs, and a bias
# gradient summed over 5,248 rows cancels: on an H200 eager bfloat16 itself was 4-8e-2 off in
# fwd+bwd (the fused kernel 3-5e-2).
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-3, "bf16": 3e-2}


def call(torch, forward, step, params, mode, h, h0, mask, dy, state):
    """(fn, the tensors whose .grad do_bench clears before each call) for one call of the mode."""
    if mode == "step":
        return torch.no_grad()(lambda: step(h0, state)), None
    if mode == "fwd":
        return torch.no_grad()(lambda: forward(h, mask)), None
    hg = h.detach().requires_grad_()
    return (lambda: forward(hg, mask).backward(dy)), [hg, *params]


def graphed(torch, module, mode: str, h, mask):
    """A copy of module whose forward (and its backward) replays CUDA graphs captured on h and mask.

    The copy keeps the module's weights (its own Parameters, so its gradients are its own);
    make_graphed_callables runs 3 warm-up calls on a side stream before capturing, so Triton
    compiles and cuBLAS picks its kernels outside the capture."""
    clone = copy.deepcopy(module)
    sample = h.detach().requires_grad_(mode == "fwd+bwd")
    return torch.cuda.make_graphed_callables(clone, (sample, mask))


def outputs(torch, forward, step, params, mode, h, h0, mask, dy, state) -> list:
    """What the error check compares: h' (h'_t for a step), and after a backward dL/dh and the
    gradient of every parameter."""
    if mode == "step":
        with torch.no_grad():
            return [step(h0, state)[0]]
    if mode == "fwd":
        with torch.no_grad():
            return [forward(h, mask)]
    for p in params:
        p.grad = None
    hg = h.detach().requires_grad_()
    out = forward(hg, mask)
    out.backward(dy)
    return [out.detach(), hg.grad, *(p.grad for p in params)]


def run_cleared(fn, grads) -> None:
    """fn() with the .grad of each tensor in grads cleared first, as do_bench runs it."""
    for x in grads or ():
        x.grad = None
    fn()


def host_ms(torch, fn, grads, calls: int = 30) -> float:
    """Median host time to issue one call (perf_counter around it, the GPU idle before it)."""
    import statistics
    import time

    times = []
    for i in range(calls + 3):  # 3 warm-up calls
        for x in grads or ():
            x.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if i >= 3:
            times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def profile_kernels(torch, fn, grads, steps: int = 5) -> list[dict]:
    """GPU time per kernel name over `steps` run_cleared calls of fn (after one warm-up call),
    largest first."""
    from torch.profiler import ProfilerActivity, profile

    run_cleared(fn, grads)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run_cleared(fn, grads)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and str(getattr(e, "device_type", "CUDA")).endswith("CUDA"):  # kernels, not the ops around them
            rows.append({"kernel": e.key[:90], "us_per_call": us / steps, "launches_per_call": e.count / steps})
    return sorted(rows, key=lambda r: -r["us_per_call"])


@contextlib.contextmanager
def matmul_precision(torch, precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside the block, the old setting after it."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def make_inputs(torch, mode: str, B: int, T: int, d: int, dtype) -> tuple:
    """(mode, h, h0, mask, dy, state): the arguments of call and outputs after the provider's."""
    from star_kernels import empty_state

    h = torch.randn(B, T, d, device="cuda", dtype=dtype)
    mask = torch.ones(B, T, device="cuda", dtype=torch.bool)
    mask[B // 2:, T - T // 4:] = False  # padded tails, as in a batch of replies
    state = empty_state(B, d, device="cuda", dtype=dtype)  # the reference steps in h's dtype
    return mode, h, h[:, 0].contiguous(), mask, torch.randn_like(h), state


def reference_outputs(torch, eager, inputs: tuple) -> list:
    """What outputs gives for a float32 copy of eager (the same rounded weights) on the same
    inputs in float32, TF32 off: what every provider's error is measured against."""
    from star_kernels import empty_state

    mode, h, h0, mask, dy, _ = inputs
    reference = copy.deepcopy(eager).float()
    with matmul_precision(torch, "highest"):
        return outputs(torch, reference, reference.step, list(reference.parameters()), mode, h.float(), h0.float(),
                       mask, dy.float(), empty_state(h.shape[0], h.shape[2], device="cuda"))


def row_block(settings, mode: str, T: int) -> int:
    """The fused kernels' row block under star_triton.LaunchSettings at this mode and length."""
    smallest = settings.min_step_block_m if mode == "step" else settings.min_block_m
    return max(smallest, 1 << (T - 1).bit_length())  # at least the next power of two >= T


def launch_variants(st, args: argparse.Namespace, mode: str, T: int) -> list[tuple[str, Any]]:
    """(label, star_triton.LaunchSettings) of the tuning sweep's extra fused rows: each
    --min-block-m value (for a block and a decode step) whose row block at this shape differs
    from the default's, then each --tiles value."""
    default = st.DEFAULT_LAUNCH
    variants = []
    for bm in args.min_block_m:
        settings = dataclasses.replace(default, min_block_m=bm, min_step_block_m=bm)
        if row_block(settings, mode, T) != row_block(default, mode, T):
            variants.append((f"fused bm>={bm}", settings))
    return variants + [("fused tiles {}x{}x{}".format(*t), dataclasses.replace(default, tiles=st.Tiles(*t)))
                       for t in args.tiles]


def providers(torch, console, args: argparse.Namespace, eager, inputs: tuple, where: str) -> dict:
    """label -> (forward, step, the parameters whose gradients a fwd+bwd writes) for one shape:
    eager, fused, compile (batches in --compile-batches), the graphed copies (--graphs) and the
    fused kernels under each launch_variants setting."""
    from star_kernels import StarModule, star_triton

    mode, h, _, mask, _, _ = inputs
    fused = StarModule(args.d, backend="triton").to("cuda", h.dtype)
    fused.load_state_dict(eager.state_dict())
    found = {"eager": (eager, eager.step, list(eager.parameters())),
             "fused": (fused, fused.step, list(fused.parameters()))}
    if h.shape[0] in args.compile_batches:
        found["compile"] = (torch.compile(eager, dynamic=False), torch.compile(eager.step, dynamic=False),
                            found["eager"][2])
    if args.graphs and mode != "step":
        for label, module in (("eager graphed", eager), ("fused graphed", fused)):
            try:
                clone = graphed(torch, module, mode, h, mask)
            except Exception as exc:  # capture can fail (a host sync, a new Triton version): say so
                console.print(f"[red]{where} {label}: capture failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            found[label] = (clone, None, list(clone.parameters()))
    for label, settings in launch_variants(star_triton, args, mode, h.shape[1]):
        found[label] = (functools.partial(star_triton.fused_forward, fused, settings=settings),
                        functools.partial(star_triton.fused_step, fused, settings=settings), found["fused"][2])
    return found


def measure(torch, do_bench, fns: tuple, inputs: tuple, ref: list) -> tuple[float, float, float]:
    """(median ms, median host ms, largest relative error against ref) of one provider's
    (forward, step, params)."""
    fn, grads = call(torch, *fns, *inputs)
    ms = do_bench(fn, grad_to_none=grads, return_mode="median")
    got = outputs(torch, *fns, *inputs)
    err = max(((a.float() - r).norm() / r.norm().clamp_min(1e-30)).item() for a, r in zip(got, ref))
    return ms, host_ms(torch, fn, grads), err


def bench_shape(torch, do_bench, console, args: argparse.Namespace, ceilings: dict, name: str, mode: str,
                B: int) -> list[Row]:
    """The rows of every provider at one precision, mode and batch size, also printed as one line;
    a provider other than eager that fails is reported and left out."""
    from star_kernels import StarModule

    dtype_name, mm_precision = PRECISIONS[name]
    dtype, T, where = getattr(torch, dtype_name), 1 if mode == "step" else args.time, f"{name} {mode} B={B}"
    results = {}
    with matmul_precision(torch, mm_precision):
        eager = StarModule(args.d, backend="torch").to("cuda", dtype)
        inputs = make_inputs(torch, mode, B, T, args.d, dtype)
        ref = reference_outputs(torch, eager, inputs)
        for label, fns in providers(torch, console, args, eager, inputs, where).items():
            try:
                results[label] = measure(torch, do_bench, fns, inputs, ref)
            except Exception as exc:  # e.g. a configuration that does not compile: say so, go on
                if label == "eager":
                    raise
                console.print(f"[red]{where} {label}: {type(exc).__name__}: {str(exc)[:300]}")
    nbytes, flops = work(mode, B, T, args.d, torch.finfo(dtype).bits // 8)
    memory_ms = nbytes / ceilings["bandwidth_gbps"] / 1e6
    compute_ms = flops / ceilings[f"matmul_tflops_{name}"] / 1e9
    floor_ms, bound = max((memory_ms, "memory"), (compute_ms, "compute"))
    rows = []
    for label, (ms, host, err) in results.items():
        rows.append(Row(name, mode, B, T, label, ms, nbytes / ms / 1e6, flops / ms / 1e9, results["eager"][0] / ms,
                        ms / floor_ms, host, err, memory_ms, compute_ms, bound))
        if err > max(TOLERANCE[name], 2 * results["eager"][2]):
            console.print(f"[red]{where} {label}: relative error {err:.1e} is over {TOLERANCE[name]} and twice eager's")
    console.print(f"[dim]{where}: " + ", ".join(
        f"{k} {v[0]:.3f} ms (host {v[1]:.3f}, err {v[2]:.1e})" for k, v in results.items()))
    return rows


def profile_backends(torch, console, args: argparse.Namespace) -> dict:
    """The GPU kernels of one fused and one eager fwd+bwd (first precision, largest batch), each
    also printed as a table."""
    from rich.table import Table

    from star_kernels import StarModule

    name = args.precisions[0]
    dtype_name, mm_precision = PRECISIONS[name]
    B, dtype = max(args.batches), getattr(torch, dtype_name)
    found: dict = {"precision": name, "batch": B}
    with matmul_precision(torch, mm_precision):
        h = torch.randn(B, args.time, args.d, device="cuda", dtype=dtype)
        dy = torch.randn_like(h)
        for backend in ("triton", "torch"):
            mod = StarModule(args.d, backend=backend).to("cuda", dtype)
            fn, grads = call(torch, mod, mod.step, list(mod.parameters()), "fwd+bwd", h, None, None, dy, None)
            kernels = found[backend] = profile_kernels(torch, fn, grads)
            table = Table(title=f"fwd+bwd kernels, backend={backend}, {name}, B={B}, T={args.time}: "
                                f"{sum(k['us_per_call'] for k in kernels):.1f} us GPU time per call")
            for col in ("kernel", "us/call", "launches/call"):
                table.add_column(col)
            for k in kernels[:12]:
                table.add_row(k["kernel"], f"{k['us_per_call']:.1f}", f"{k['launches_per_call']:.0f}")
            console.print(table)
    return found


def print_summary(console, report: dict, rows: list[Row], args: argparse.Namespace) -> None:
    """The measured ceilings, then one table row per provider and shape."""
    from rich.table import Table

    ceilings = report["ceilings"]
    console.print(f"\n{report['device']}, {report['date']}: copy {ceilings['bandwidth_gbps']:.0f} GB/s; "
                  + ", ".join(f"{k.split('_')[-1]} matmul {v:.0f} TFLOP/s"
                              for k, v in ceilings.items() if k.startswith("matmul")))
    table = Table(title=f"STAR module, d={args.d}, time {args.time} (step: 1)")
    for col in ("precision", "mode", "B", "provider", "ms", "host ms", "GB/s", "TFLOP/s", "x eager",
                "mem floor ms", "flop floor ms", "x floor", "bound", "err"):
        table.add_column(col, justify="left" if col in ("precision", "mode", "provider", "bound") else "right")
    for r in rows:
        table.add_row(r.precision, r.mode, str(r.batch), r.provider, f"{r.ms:.3f}", f"{r.host_ms:.3f}",
                      f"{r.gbps:.0f}", f"{r.tflops:.1f}", f"{r.vs_eager:.2f}", f"{r.memory_floor_ms:.4f}",
                      f"{r.compute_floor_ms:.4f}", f"{r.vs_floor:.2f}", r.bound, f"{r.err:.1e}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU here: the kernel benchmark needs one. The kernels' correctness tests run on "
              "the CPU under Triton's interpreter: pytest tests/test_kernel.py")
        return 0
    import triton
    from rich.console import Console
    from triton.testing import do_bench

    from star_kernels import star_triton
    from star_runtime.cli import EXIT_USAGE

    console = Console(width=200)  # the table has 14 columns; logs are not terminals
    if args.time > star_triton.MAX_T:
        console.print(f"[red]--time {args.time} is past the fused kernel's limit of {star_triton.MAX_T}")
        return EXIT_USAGE
    report = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__, "triton": triton.__version__,
        "ceilings": measure_ceilings(torch, do_bench, args.precisions), "rows": [],
    }
    rows: list[Row] = []
    for name in args.precisions:
        for mode in args.modes:
            for B in args.batches:
                rows += bench_shape(torch, do_bench, console, args, report["ceilings"], name, mode, B)
                report["rows"] = [asdict(r) for r in rows]
                if args.json:  # after every shape, so a run cut short still leaves its numbers
                    write_json(args.json, report)
    if args.profile:
        report["profile"] = profile_backends(torch, console, args)
        if args.json:
            write_json(args.json, report)
    print_summary(console, report, rows, args)
    return 0


def write_json(path: str, report: dict) -> None:
    """Write `report` as JSON to `path` atomically, creating its folder."""
    from star_runtime.atomic import write_text_atomically

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomically(path, json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
