"""One STAR training step on CUDA, fused kernel vs PyTorch reference (the issue-4 switch).

    python benchmarks/train_step.py      # needs a CUDA GPU; without one it says so and exits 0

Base 90M preset, random weights and ids, micro-batch 32 x (160 source, 41 target), bf16 autocast
and TF32 as star-train sets them. Prints JSON: ms per fwd+bwd step for StarModule(backend="auto")
and backend="torch", how many steps ran the fused kernel, STAR's own fwd+bwd time, and the
first-step loss of each (they differ by bf16 vs TF32 rounding).
"""
import json
import sys
import time

import torch

if not torch.cuda.is_available():
    print("train_step.py: no CUDA GPU here; nothing to measure")
    sys.exit(0)
import star_kernels.star_triton as st
from star_training.config import StarConfig, base_config
from star_training.model import StarForConditionalGeneration

torch.set_float32_matmul_precision("high")  # what star-train now sets on CUDA
V, B, S, T = 54952, 32, 160, 41
cfg = base_config("base", V)
model = StarForConditionalGeneration(cfg, StarConfig(strategy_token_ids=list(range(V - 8, V)))).cuda()
g = torch.Generator().manual_seed(0)
src = torch.randint(4, V - 8, (B, S), generator=g).cuda()
lab = torch.randint(4, V - 8, (B, T), generator=g).cuda()
lab[:, 0] = torch.randint(V - 8, V, (B,), generator=g).cuda()
dec = torch.cat([torch.ones(B, 1, dtype=torch.long, device="cuda"), lab[:, :-1]], 1)
strategy = lab[:, 0] - (V - 8)
calls = {"n": 0}
orig = st.fused_forward
def counted(*a, **k):
    calls["n"] += 1
    return orig(*a, **k)
st.fused_forward = counted
report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [B, S, T]}
for backend in ("auto", "torch"):
    model.star.backend = backend
    calls["n"] = 0
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(src, torch.ones_like(src), dec, torch.ones_like(dec), labels=lab, strategy=strategy)
            loss = 0.5 * out.loss_lm + 0.5 * out.loss_st
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()
    losses = [step() for _ in range(3)]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    report["backend_" + backend] = {"ms_per_step": (time.perf_counter() - t0) / 20 * 1e3, "first_loss": losses[0],
                       "fused_calls_in_23_steps": calls["n"]}
    # STAR alone inside the step: time the module's fwd+bwd on the decoder states of this batch
    h = torch.randn(B, T, 512, device="cuda", requires_grad=True)
    def star_only():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model.star(h, torch.ones(B, T, device="cuda", dtype=torch.bool))
        y.float().sum().backward()
    for _ in range(3): star_only()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(50): star_only()
    torch.cuda.synchronize()
    report["backend_" + backend]["star_fwd_bwd_ms"] = (time.perf_counter() - t0) / 50 * 1e3
report["loss_abs_diff"] = abs(report["backend_auto"]["first_loss"] - report["backend_torch"]["first_loss"])
print(json.dumps(report, indent=1))
