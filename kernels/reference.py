"""STAR module: the plain PyTorch reference (SPEC section 1).

Every other implementation (the fused Triton kernel, the ONNX graph, the numpy runtime) is
tested against the functions in this file. For a final decoder state h_t in R^d:

    s_t    = q^T tanh(W_a h_t + b_a)                         score                  [B, T]
    z_t    = sum_{i<=t, mask_i} softmax_i(s) * h_i           causal attention pool  [B, T, d]
    g_t    = sigmoid(W_g2 relu(W_g1 z_t + b_g1) + b_g2)      gate                   [B, T, d] or [B, T, 1]
    hhat_t = W_p2 relu(W_p1 z_t + b_p1) + b_p2               refined strategy state [B, T, d]
    h'_t   = g_t * hhat_t + (1 - g_t) * h_t                  fused state            [B, T, d]

Our own decisions (the paper is silent):
- Pooling is causal, so teacher-forced training and token-by-token decoding compute the same
  function. Padded positions (mask 0) are never pooled; a position with no valid position at or
  before it gets z = 0.
- Decoding carries the pool as a streaming state per sequence (the online-softmax trick):
  running max m [B], normaliser l [B] and weighted sum a [B, d], so a new token costs O(d):

      m' = max(m, s_t);  l' = l e^{m - m'} + e^{s_t - m'};  a' = a e^{m - m'} + e^{s_t - m'} h_t
      z_t = a' / l'

  The empty state is m = -1e30 (finite, so e^{m - m'} is an exact 0 rather than a NaN from
  (-inf) - (-inf)), l = 0, a = 0.
- The gate bias starts at -3 (sigmoid(-3) = 0.047), so adding STAR to a fine-tuned base model
  changes h by about 5%: STAR starts near the identity.

One switch picks the implementation: StarModule(backend=...) (also the attribute `backend`).
"auto" runs the fused Triton kernel (kernels/star_triton.py) on CUDA tensors where Triton imports
and the kernel is the faster one (bfloat16, float16, float32 with TF32 allowed), and this file's
ops elsewhere (CPU, tracing, ONNX export, torch.compile, float32 with TF32 off); "torch" always
runs this file; "triton" always runs the kernel and raises where it cannot. Triton is imported
on first use, so this file works without it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EMPTY_MAX = -1e30
DEFAULT_GATE_BIAS = -3.0
BACKENDS = ("auto", "torch", "triton")
_star_triton = None  # kernels.star_triton once imported; False where Triton is missing


def _triton_kernels():
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


class StarState(NamedTuple):
    """Streaming pooling state of a batch of sequences."""

    m: torch.Tensor  # [B] running max of the scores
    l: torch.Tensor  # [B] running softmax normaliser, relative to m
    a: torch.Tensor  # [B, d] running weighted sum of states, relative to m


def empty_state(batch: int, d: int, *, device=None, dtype=torch.float32) -> StarState:
    """The state before any decoder position has been seen."""
    return StarState(
        torch.full((batch,), EMPTY_MAX, device=device, dtype=dtype),
        torch.zeros(batch, device=device, dtype=dtype),
        torch.zeros(batch, d, device=device, dtype=dtype),
    )


def causal_pool(h: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """z_t = sum_{i<=t, mask_i} softmax_i(s) h_i.

    h: [B, T, d]; s: [B, T]; mask: [B, T] (nonzero = real token) or None. Returns z: [B, T, d].
    T is at most 41 in training, so the [B, T, T] weight matrix is cheaper than a scan.
    """
    B, T, _ = h.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()  # [T(query), T(key)]
    allowed = allowed.expand(B, T, T)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, :]  # keys must be real tokens
    logits = s[:, None, :].expand(B, T, T).masked_fill(~allowed, torch.finfo(s.dtype).min)
    # A row with no allowed key would be a uniform softmax over nothing: zero it instead.
    w = torch.softmax(logits, dim=-1) * allowed  # [B, T, T]
    return torch.bmm(w, h)  # [B, T, d]


class StarModule(nn.Module):
    """SARA (score, pooling, gate) and SR (refiner), fused into h'.

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
    def _fused_kernels(self, h: torch.Tensor):
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
        s = self.score(h_t)  # [B]
        m = torch.maximum(state.m, s)
        scale_old, scale_new = torch.exp(state.m - m), torch.exp(s - m)  # [B]
        l = state.l * scale_old + scale_new
        a = state.a * scale_old[:, None] + scale_new[:, None] * h_t  # [B, d]
        z = a / l[:, None]
        return self.mix(h_t, z), StarState(m, l, a)
