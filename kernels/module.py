"""StarModule: STAR's layers (score, gate, refiner) and the switch between its two implementations.

One switch picks the implementation: StarModule(backend=...) (also the attribute `backend`).
"auto" runs the fused Triton kernel (star_triton.py) on CUDA tensors where Triton imports and the
kernel is the faster one (bfloat16, float16, float32 with TF32 allowed), and the PyTorch
reference (reference.py) elsewhere (CPU, tracing, ONNX export, torch.compile, float32 with TF32
off); "torch" always runs the reference; "triton" always runs the kernel and raises where it
cannot. Triton is imported on first use, so this file works without it.

The gate bias starts at -3 (sigmoid(-3) = 0.047), so adding STAR to a fine-tuned base model
changes h by about 5%: STAR starts near the identity.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .reference import causal_pool, pool_step
from .state import StarState

DEFAULT_GATE_BIAS = -3.0
BACKENDS = ("auto", "torch", "triton")
_star_triton: ModuleType | bool | None = None  # star_triton once imported; False where Triton is missing


def _triton_kernels() -> ModuleType | None:
    """The fused-kernel module, imported on first use; None where Triton is not installed."""
    global _star_triton
    if _star_triton is None:
        try:
            from . import star_triton
        except ImportError:
            star_triton = False
        _star_triton = star_triton
    return _star_triton or None


def _tracing() -> bool:
    """Tracing, ONNX export and torch.compile need the plain ops, not a Triton launch."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class StarModule(nn.Module):
    """SARA (score, pooling, gate) and SR (refiner), fused into h' (the equations of reference.py).

    d: model width. gate: "vector" (g in (0,1)^d) or "scalar" (one g per position).
    gate_hidden / refine_hidden: widths of the two FFNs (default d).
    backend: "auto", "torch" or "triton" (module docstring).
    """

    def __init__(
        self,
        d: int,
        *,
        gate: str = "vector",
        gate_hidden: int | None = None,
        refine_hidden: int | None = None,
        gate_bias_init: float = DEFAULT_GATE_BIAS,
        init_std: float = 0.02,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if gate not in ("vector", "scalar"):
            raise ValueError(f"gate must be 'vector' or 'scalar', not {gate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.backend = backend
        self.d, self.gate_kind = d, gate
        gh, rh = gate_hidden or d, refine_hidden or d
        self.score_proj = nn.Linear(d, d)  # W_a, b_a
        self.score_vec = nn.Parameter(torch.empty(d))  # q
        self.gate_fc1 = nn.Linear(d, gh)  # W_g1, b_g1
        self.gate_fc2 = nn.Linear(gh, d if gate == "vector" else 1)  # W_g2, b_g2
        self.refine_fc1 = nn.Linear(d, rh)  # W_p1, b_p1
        self.refine_fc2 = nn.Linear(rh, d)  # W_p2, b_p2
        self.gate_bias_init, self.init_std = gate_bias_init, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BART-style N(0, 0.02) weights and zero biases; then the gate bias that makes STAR
        start near the identity (see module docstring)."""
        for lin in (self.score_proj, self.gate_fc1, self.gate_fc2, self.refine_fc1, self.refine_fc2):
            nn.init.normal_(lin.weight, std=self.init_std)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.score_vec, std=1.0 / math.sqrt(self.d))
        nn.init.constant_(self.gate_fc2.bias, self.gate_bias_init)

    def extra_repr(self) -> str:
        return f"d={self.d}, gate={self.gate_kind}, backend={self.backend}"

    # -- the pieces -------------------------------------------------------------------------
    def score(self, h: torch.Tensor) -> torch.Tensor:
        """s = q^T tanh(W_a h + b_a): [..., d] -> [...]."""
        return torch.tanh(self.score_proj(h)) @ self.score_vec

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """g = sigmoid(W_g2 relu(W_g1 z + b_g1) + b_g2): [..., d] -> [..., d] or [..., 1]."""
        return torch.sigmoid(self.gate_fc2(F.relu(self.gate_fc1(z))))

    def refine(self, z: torch.Tensor) -> torch.Tensor:
        """hhat = W_p2 relu(W_p1 z + b_p1) + b_p2: [..., d] -> [..., d]."""
        return self.refine_fc2(F.relu(self.refine_fc1(z)))

    def mix(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h' = g(z) hhat(z) + (1 - g(z)) h."""
        g = self.gate(z)
        return g * self.refine(z) + (1 - g) * h

    # -- full sequence and streaming -----------------------------------------------------------
    def _fused_kernels(self, h: torch.Tensor) -> ModuleType | None:
        """kernels.star_triton where this call should run the fused kernel, else None."""
        if self.backend == "torch" or (self.backend == "auto" and (not h.is_cuda or _tracing())):
            return None
        kernels = _triton_kernels()
        reason = "Triton is not installed" if kernels is None else kernels.unsupported(h)
        if reason is None and self.backend == "auto":
            reason = kernels.slower_than_reference(h)
        if reason is None:
            return kernels
        if self.backend == "triton":
            raise ValueError(f"StarModule(backend='triton') cannot run the fused kernel: {reason}")
        return None

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced STAR over a block: h [B, T, d], mask [B, T] -> h' [B, T, d]."""
        if (kernels := self._fused_kernels(h)) is not None:
            return kernels.fused_forward(self, h, mask)
        return self.mix(h, causal_pool(h, self.score(h), mask))

    def step(self, h_t: torch.Tensor, state: StarState) -> tuple[torch.Tensor, StarState]:
        """One decoding position: h_t [B, d] and the state before it -> (h'_t [B, d], new state)."""
        if (kernels := self._fused_kernels(h_t)) is not None:
            return kernels.fused_step(self, h_t, state)
        z, new_state = pool_step(h_t, self.score(h_t), state)
        return self.mix(h_t, z), new_state
