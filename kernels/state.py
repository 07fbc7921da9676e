"""STAR's streaming pooling state: what decoding carries per sequence between positions.

The causal attention pool z_t = sum_{i<=t} softmax_i(s) h_i is carried as the online-softmax
state of each sequence, so a new token costs O(d): running max m [B], normaliser l [B] and
weighted sum a [B, d], both relative to m:

    m' = max(m, s_t);  l' = l e^{m - m'} + e^{s_t - m'};  a' = a e^{m - m'} + e^{s_t - m'} h_t
    z_t = a' / l'

The empty state is m = EMPTY_MAX = -1e30 (finite, so e^{m - m'} is an exact 0 rather than a NaN
from (-inf) - (-inf)), l = 0, a = 0.

Both implementations (reference.py and star_triton.py) read and write this state, so it lives
apart from either.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EMPTY_MAX = -1e30


class StarState(NamedTuple):
    """Streaming pooling state of a batch of sequences."""

    m: torch.Tensor  # [B] running max of the scores
    l: torch.Tensor  # [B] running softmax normaliser, relative to m
    a: torch.Tensor  # [B, d] running weighted sum of states, relative to m


def empty_state(batch: int, d: int, *, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> StarState:
    """The state before any decoder position has been seen."""
    return StarState(
        torch.full((batch,), EMPTY_MAX, device=device, dtype=dtype),
        torch.zeros(batch, device=device, dtype=dtype),
        torch.zeros(batch, d, device=device, dtype=dtype),
    )
