"""Fused STAR kernel (kernels/star_triton.py) against the float64 PyTorch reference.

On a CPU the kernels run under Triton's interpreter, which Triton picks when triton.language and
our kernels are decorated: this module sets TRITON_INTERPRET=1 (unless set) before importing
them. In a whole-suite run another module may have imported Triton first (import torch._dynamo
does); then the CPU cases skip here and test_cpu_cases_in_fresh_process runs this file again in
a new Python. On a GPU machine run `TRITON_INTERPRET=0 pytest tests/test_kernel.py`: the CPU
cases skip and the CUDA cases run the compiled kernels.

Every check draws its own inputs, fills every buffer the kernels write with NaN first (so an
element left unwritten fails), and compares ||out - ref|| / ||ref|| with the reference run in
float64 on the same (rounded) inputs: under 1e-4 in float32, 1e-2 in float16.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WANT_INTERPRETER = os.environ.setdefault("TRITON_INTERPRET", "1").lower() in ("1", "true", "on", "yes")
torch = pytest.importorskip("torch")
tl = pytest.importorskip("triton.language")

from star_kernels import star_triton as st  # noqa: E402
from star_kernels import StarModule, StarState, empty_state  # noqa: E402

# Triton imported before the variable was set: its own jit functions (tl.zeros...) are compiled
# ones, which the interpreter cannot call.
STALE_TRITON = WANT_INTERPRETER and type(tl.zeros).__name__ != "InterpretedFunction"
if WANT_INTERPRETER and not STALE_TRITON and not st.INTERPRETED:
    st = importlib.reload(st)  # star_triton imported earlier without the interpreter: decorate again

ON_CPU = pytest.mark.skipif(
    not st.INTERPRETED or STALE_TRITON,
    reason="Triton was imported before TRITON_INTERPRET=1: see test_cpu_cases_in_fresh_process"
    if STALE_TRITON else "CPU cases need TRITON_INTERPRET=1",
)
ON_CUDA = pytest.mark.skipif(
    st.INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0"
)
DEVICES = [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_CUDA)]
REPO = Path(__file__).resolve().parents[1]
# bfloat16 keeps 8 mantissa bits to float16's 11 (8x the rounding); the worst float16 error seen
# over 12 draws of every CASES entry was 3.4e-3 (float32: 2.2e-6). The interpreter cannot run
# bfloat16 (see star_triton.unsupported), so that tolerance is checked on CUDA only.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp in sigmoid


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the kernels write starts as NaN."""

    def nan_filled(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(st, "_new", nan_filled)


def make_module(d: int, gate: str = "vector", gh: int | None = None, rh: int | None = None,
                *, relu_margin: bool = False) -> StarModule:
    """A float64 module with weights that exercise every path: FFN activations O(1), gates away
    from 0 and 1, scores spread over a few units so the softmax is neither flat nor one-hot.

    b_p2 = 3 puts hhat above h, so with dy > 0 (draw) every row's gate gradient has one sign:
    the scalar gate's bias gradient is a single sum over rows, which with random signs can cancel
    to a small fraction of its terms and magnify their rounding (seen: 500x, 1e-4 in float32 for
    the kernel and 3e-5 for PyTorch's float32; 2.2e-2 and 6.1e-2 in float16).

    relu_margin (float16 and bfloat16) keeps the first FFN layers' pre-activations near +-2 (bias
    +-2, W z ~ N(0, 0.5^2)): in float16 one within ~1e-3 of 0 can fall on the other side of the
    relu than in float64, moving a whole gradient entry (2 of 5,600 elements did, and dL/dW_p1 was
    2.5e-2 off). Half the units are off, so the relu masks are still tested.
    """
    mod = StarModule(d, gate=gate, gate_hidden=gh, refine_hidden=rh, backend="torch").double()
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name == "score_vec":
                p.normal_(0.0, 2.0 / math.sqrt(d))
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 0.5)
        mod.refine_fc2.bias.fill_(3.0)
        if relu_margin:
            for fc1 in (mod.gate_fc1, mod.refine_fc1):
                fc1.weight.mul_(0.5)
                fc1.bias.copy_(torch.randint(0, 2, fc1.bias.shape).double() * 4.0 - 2.0)
    return mod


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; where ref is exactly zero (e.g. score gradients at T = 1, a
    softmax over one element) the RMS of out instead."""
    diff, scale = (out.double() - ref.double()).norm(), ref.double().norm()
    return (diff / scale if scale > 0 else diff / math.sqrt(out.numel())).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{name}: {bad} of {out.numel()} elements not finite (unwritten or overflow)"
    err = rel(out, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def draw(B: int, T: int, d: int, masked: bool, dtype: torch.dtype, device: str):
    """h [B, T, d] rounded to dtype, a padding mask with some whole-prefix padding, and a
    positive dy (see make_module)."""
    h = torch.randn(B, T, d, dtype=torch.float64).to(dtype).to(device)
    mask = None
    if masked:
        mask = torch.rand(B, T) > 0.3
        mask[0, : min(2, T)] = False  # rows with nothing to pool: z = 0
        mask = mask.to(device)
    # dy ~ 1/sqrt(d): with dy ~ 1 the scalar gate's dL/dW_g2 (a sum over B*T rows of d-term
    # sums) passed float16's 65504 at B5 T41 d512, as it would in PyTorch without loss scaling.
    dy = torch.randn(B, T, d, dtype=torch.float64).abs() / math.sqrt(d)
    return h, mask, dy.to(dtype).to(device)


def check_forward_backward(B, T, d, gate, gh, rh, masked, dtype, device, settings=st.DEFAULT_LAUNCH) -> None:
    mod = make_module(d, gate, gh, rh, relu_margin=dtype != torch.float32)
    weights = st.StarWeights(*(w.detach().to(dtype).to(device) for w in st.module_weights(mod)))
    ref_mod = mod.to(device)
    for p in ref_mod.parameters():  # the reference sees the kernel's rounded weights
        p.data.copy_(p.data.to(dtype).double())
    tol = TOL[dtype]

    # inference forward (no saved tensors)
    h, mask, _ = draw(B, T, d, masked, dtype, device)
    out, _, saved = st.star_forward(h, weights, mask, settings=settings)
    assert saved is None
    assert_close("h' (no grad)", out, ref_mod(h.double(), mask), tol)

    # training forward and backward, fresh inputs
    h, mask, dy = draw(B, T, d, masked, dtype, device)
    leaves = [w.clone().requires_grad_() for w in weights]
    hk = h.clone().requires_grad_()
    out = st.StarFunction.apply(hk, mask, settings, *leaves)
    out.backward(dy)
    h_ref = h.double().requires_grad_()
    out_ref = ref_mod(h_ref, mask)
    out_ref.backward(dy.double())
    assert_close("h'", out, out_ref, tol)
    assert_close("dL/dh", hk.grad, h_ref.grad, tol)
    for field, w, w_ref in zip(st.StarWeights._fields, leaves, st.module_weights(ref_mod)):
        assert_close(f"dL/d{field}", w.grad, w_ref.grad, tol)


# Every listed value appears at least once: T 1, 7, 41, 67; d 64, 96, 512; B 1, 5; both gates,
# FFN widths unlike d, with and without padding. (B, T, d, gate, gate_hidden, refine_hidden, masked)
CASES = [
    (1, 1, 64, "vector", None, None, False),
    (5, 7, 96, "scalar", 48, 160, True),
    (5, 41, 64, "vector", None, None, True),
    (1, 67, 96, "vector", 80, None, True),
    (1, 7, 512, "vector", None, None, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-d{}-{}-gh{}-rh{}-mask{}".format(*c))
def test_forward_backward_float32(case, device) -> None:
    check_forward_backward(*case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["B5-T7-d96-scalar", "B5-T41-d64"])
def test_forward_backward_float16(case, device) -> None:
    check_forward_backward(*case, torch.float16, device)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("T", [1, 7, 41, 67])
@pytest.mark.parametrize("d", [64, 96, 512])
def test_forward_backward_grid(d, T, B, dtype) -> None:
    if STALE_TRITON:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1: see test_cpu_cases_in_fresh_process")
    device = "cpu" if st.INTERPRETED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA and TRITON_INTERPRET=0")
    gate = "scalar" if (T + d) % 2 else "vector"
    check_forward_backward(B, T, d, gate, None, None, True, dtype, device)


@ON_CPU
@pytest.mark.parametrize("tiles", [(64, 64, 3), (128, 64, 2)], ids=["64x64x3", "128x64x2"])
def test_other_tile_shapes(tiles) -> None:
    """Other tile shapes (64x64x3: what the default was measured against; column tiles wider than d)
    compute the same function. On a GPU, benchmarks/kernel.py --tiles checks each configuration
    it times against the reference."""
    settings = st.LaunchSettings(tiles=st.Tiles(*tiles))
    check_forward_backward(5, 41, 96, "scalar", 48, None, True, torch.float32, "cpu", settings)


@pytest.mark.parametrize("device", DEVICES)
def test_weights_in_another_dtype_are_cast(device) -> None:
    """float32 weights with a float16 h (mixed precision) give exactly what float16 weights give,
    and float32 gradients."""
    weights = [w.detach().float().to(device) for w in st.module_weights(make_module(64, relu_margin=True))]
    h, mask, dy = draw(2, 5, 64, True, torch.float16, device)
    results = []
    for ws in (weights, [w.half() for w in weights]):
        leaves = [w.clone().requires_grad_() for w in ws]
        hk = h.clone().requires_grad_()
        out = st.StarFunction.apply(hk, mask, st.DEFAULT_LAUNCH, *leaves)
        out.backward(dy)
        results.append([out, hk.grad, *(w.grad for w in leaves)])
    assert all(g.dtype == torch.float32 for g in results[0][2:])
    for name, a, b in zip(["h'", "dL/dh", *st.StarWeights._fields], *results):
        assert torch.equal(a.float(), b.float()), f"{name} differs between float32 and float16 weights"


@ON_CUDA
@pytest.mark.parametrize("case", [(5, 41, 512, "vector", None, None, True), (3, 67, 96, "scalar", 48, None, True)])
def test_cuda_bfloat16_and_tf32(case) -> None:
    check_forward_backward(*case, torch.bfloat16, "cuda")
    mod = make_module(*case[2:6]).float().cuda()
    h, mask, _ = draw(*case[:3], True, torch.float32, "cuda")
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 products, about 3e-4 relative each
    try:
        out = st.star_forward(h, st.module_weights(mod), mask)[0]
    finally:
        torch.set_float32_matmul_precision(old)
    assert_close("h' (tf32)", out, mod.double()(h.double(), mask), 2e-3)  # up to 4 products chained


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_token_by_token_equals_full_sequence(dtype, device) -> None:
    B, T, d = 5, 7, 96
    mod = make_module(d, "vector", None, 64)
    weights = st.StarWeights(*(w.detach().to(dtype).to(device) for w in st.module_weights(mod)))
    h, _, _ = draw(B, T, d, False, dtype, device)
    full, final, _ = st.star_forward(h, weights, return_state=True)

    state = empty_state(B, d, device=device)
    steps = []
    for t in range(T):
        out_t, state = st.star_step(h[:, t], weights, state)
        steps.append(out_t)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # same kernel, same arithmetic but the carry
    assert_close("step outputs vs full sequence", torch.stack(steps, 1), full, tol)
    for name, a, b in zip(StarState._fields, state, final):
        assert_close(f"state.{name}: steps vs full sequence", a, b, tol)

    # the state also matches the reference's streaming state, in float64
    ref_state = empty_state(B, d, device=device, dtype=torch.float64)
    ref_mod = mod.to(device)
    for t in range(T):
        _, ref_state = ref_mod.step(h[:, t].double(), ref_state)
    for name, a, b in zip(StarState._fields, state, ref_state):
        assert_close(f"state.{name} vs reference", a, b, TOL[dtype])

    # two chunks with the state carried between them equal one block
    first, mid, _ = st.star_forward(h[:, :3], weights, return_state=True)
    second, _, _ = st.star_forward(h[:, 3:], weights, state=mid)
    assert_close("chunked vs full", torch.cat([first, second], 1), full, tol)


def test_switch_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran on CPU tensors with backend='auto'")

    monkeypatch.setattr(st, "fused_forward", refuse)
    monkeypatch.setattr(st, "fused_step", refuse)
    auto, plain = StarModule(64), StarModule(64, backend="torch")
    plain.load_state_dict(auto.state_dict())
    h = torch.randn(2, 5, 64)
    assert auto._fused_kernels(h) is None
    assert torch.equal(auto(h), plain(h))
    state = empty_state(2, 64)
    assert torch.equal(auto.step(h[:, 0], state)[0], plain.step(h[:, 0], state)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_module_backends_agree(device) -> None:
    """StarModule.forward/step with backend='triton' (the path 'auto' takes on CUDA) equal
    backend='torch', gradients included."""
    fused = StarModule(64, gate="scalar", backend="triton").to(device)
    plain = StarModule(64, gate="scalar", backend="torch").to(device)
    plain.load_state_dict(fused.state_dict())
    h, mask, dy = draw(3, 7, 64, True, torch.float32, device)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    out1, out2 = fused(h1, mask), plain(h2, mask)
    assert_close("module h'", out1, out2, 1e-5)
    (out1 * dy).sum().backward()
    (out2 * dy).sum().backward()
    assert_close("module dL/dh", h1.grad, h2.grad, 1e-5)
    for (name, p1), p2 in zip(fused.named_parameters(), plain.parameters()):
        assert_close(f"module dL/d{name}", p1.grad, p2.grad, 1e-5)
    state = empty_state(3, 64, device=device)
    assert_close("module step", fused.step(h[:, 0], state)[0], plain.step(h[:, 0], state)[0], 1e-5)


@ON_CUDA
def test_cuda_auto_runs_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = st.fused_forward
    monkeypatch.setattr(st, "fused_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    mod = StarModule(64).to("cuda", torch.bfloat16)
    mod(torch.randn(2, 5, 64, device="cuda", dtype=torch.bfloat16))
    assert calls, "backend='auto' did not run the fused kernel on CUDA"
    long = torch.randn(1, st.MAX_T + 1, 64, device="cuda", dtype=torch.bfloat16)
    assert mod._fused_kernels(long) is None  # too long for one program: the reference runs
    assert mod.float()._fused_kernels(torch.randn(2, 5, 64, device="cuda")) is None  # TF32 off


def test_auto_keeps_float32_without_tf32_on_the_reference() -> None:
    h = torch.empty(1, 3, 8)
    assert st.slower_than_reference(h) is not None  # PyTorch's default: TF32 off
    assert st.slower_than_reference(h.half()) is None
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert st.slower_than_reference(h) is None
    finally:
        torch.set_float32_matmul_precision(old)


def test_bad_backend_and_unsupported_shapes() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        StarModule(8, backend="cuda")
    mod = StarModule(8, backend="triton")
    with pytest.raises(ValueError, match=f"sequence length {st.MAX_T + 1} > {st.MAX_T}"):
        mod(torch.randn(1, st.MAX_T + 1, 8))
    with pytest.raises(ValueError, match="dtype"):
        mod.double()(torch.randn(1, 3, 8, dtype=torch.float64))
    if st.INTERPRETED:
        with pytest.raises(ValueError, match="bfloat16 under TRITON_INTERPRET"):
            mod.bfloat16()(torch.randn(1, 3, 8, dtype=torch.bfloat16))


@pytest.mark.skipif(not STALE_TRITON, reason="the CPU cases ran in this process")
@pytest.mark.parametrize("selection", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_cpu_cases_in_fresh_process(selection: str) -> None:
    """The CPU cases of this file (the default ones, or with -m slow the full grid) in a new Python."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", selection],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_reference_works_without_triton() -> None:
    """kernels/module.py imports Triton only on first use: with Triton missing, 'auto' runs
    the reference and 'triton' says why it cannot run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, star_kernels\n"
        "from star_kernels import StarModule\n"
        "h = torch.randn(2, 3, 8)\n"
        "assert StarModule(8)(h).shape == h.shape\n"
        "try:\n"
        "    StarModule(8, backend='triton')(h)\n"
        "except ValueError as e:\n"
        "    assert 'Triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_benchmark_without_gpu_says_so_and_rejects_bad_flags() -> None:
    bench = [sys.executable, str(REPO / "benchmarks" / "kernel.py")]
    run = subprocess.run(bench, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "No CUDA GPU" in run.stdout, run.stdout + run.stderr
    run = subprocess.run([*bench, "--batches", "x"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "comma-separated integers" in run.stderr and "Traceback" not in run.stderr
