"""STAR's pooling in plain PyTorch (SPEC section 1): the reference every other implementation
(the fused Triton kernel, the ONNX graph, the numpy runtime) is tested against.

For a final decoder state h_t in R^d:

    s_t    = q^T tanh(W_a h_t + b_a)                         score                  [B, T]
    z_t    = sum_{i<=t, mask_i} softmax_i(s) * h_i           causal attention pool  [B, T, d]
    g_t    = sigmoid(W_g2 relu(W_g1 z_t + b_g1) + b_g2)      gate                   [B, T, d] or [B, T, 1]
    hhat_t = W_p2 relu(W_p1 z_t + b_p1) + b_p2               refined strategy state [B, T, d]
    h'_t   = g_t * hhat_t + (1 - g_t) * h_t                  fused state            [B, T, d]

The score, gate and refiner are the layers of StarModule (module.py); this file holds the pool,
over a block (causal_pool) and one position at a time (pool_step, on state.py's StarState).

Our own decisions (the paper is silent):
- Pooling is causal, so teacher-forced training and token-by-token decoding compute the same
  function. Padded positions (mask 0) are never pooled; a position with no valid position at or
  before it gets z = 0.
- Decoding carries the pool as a streaming state per sequence (state.py), so a new token costs
  O(d) rather than a pool over the whole prefix.
"""

from __future__ import annotations

import torch

from .state import StarState


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


def pool_step(h_t: torch.Tensor, s: torch.Tensor, state: StarState) -> tuple[torch.Tensor, StarState]:
    """One position of the causal pool by the online-softmax update of state.py: h_t [B, d], its
    score s [B] and the state before it -> (z_t = a' / l' [B, d], the state after it)."""
    m = torch.maximum(state.m, s)
    scale_old, scale_new = torch.exp(state.m - m), torch.exp(s - m)  # [B]
    l = state.l * scale_old + scale_new
    a = state.a * scale_old[:, None] + scale_new[:, None] * h_t  # [B, d]
    return a / l[:, None], StarState(m, l, a)
