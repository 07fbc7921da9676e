"""Choosing the next token from the logits, in numpy, with training/generate.py's semantics.

transformers' processors, in their order (what `star_training.generate.warp_logits` does):

    s        = logits, banned ids set to -inf           (strategy tokens, padding, __start__; __end__ too
                                                         before min_new_tokens or with stop_at_eos off)
    s[i]     = s[i] * p if s[i] < 0 else s[i] / p       for every id i in the decoder tokens so far
    greedy:    argmax s
    sampling:  s / temperature; keep the ids with s >= the k-th largest (top-k); of those, drop the
               low tail whose softmax mass (ascending cumulative sum) is <= 1 - top_p, keeping the
               most likely (top-p); sample from the softmax of what is left.

Cost per token: the penalty touches only the seen ids; top-k is one `argpartition` over V and
everything after it works on k values (docs/performance.md has the timings).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecodingOptions:
    """How a reply is decoded: the one definition of the paper's settings (SPEC section 1).

    The exporter writes these defaults into the bundle's manifest ("generation"); the runtime
    reads them back (`from_manifest`), and training's generate and star-eval take the same object.
    do_sample: False = greedy (the repetition penalty still applies). top_k = 0 and top_p = 1
    switch those filters off; repetition_penalty = 1 switches the penalty off. max_new_tokens:
    response tokens at most (the model's position table sets the upper bound, checked where the
    model is known). `greedy()` switches sampling off.
    """

    do_sample: bool = True
    top_p: float = 0.3
    top_k: int = 30
    temperature: float = 0.7
    repetition_penalty: float = 1.03
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        # NaN passes `x <= 0` (every comparison with NaN is False), so finiteness is checked first.
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise ValueError(f"top_k must be an integer (0 = off), not {self.top_k!r}")
        if (isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral)
                or self.max_new_tokens < 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, not {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False, not {self.do_sample!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), not {self.repetition_penalty}")

    @classmethod
    def from_manifest(cls, generation: Mapping[str, Any], **overrides: Any) -> DecodingOptions:
        """The options a manifest's "generation" holds (absent keys: the defaults), then
        `overrides` (None = keep)."""
        values = {f.name: generation[f.name] for f in fields(cls) if f.name in generation}
        return cls(**values).but(**overrides)

    def but(self, **overrides: Any) -> DecodingOptions:
        """These options with `overrides` (None = keep); ValueError for a name that is no option."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"no decoding option named {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def greedy(self) -> DecodingOptions:
        return replace(self, do_sample=False)

    def as_manifest(self) -> dict[str, Any]:
        """The options as the manifest's "generation" entry holds them."""
        return asdict(self)


def penalize(scores: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """The repetition penalty, in place, on the ids in `seen` (each once)."""
    if penalty != 1.0 and seen.size:
        values = scores[seen]
        scores[seen] = np.where(values < 0, values * penalty, values / penalty)


def distribution(scores: np.ndarray, seen: np.ndarray, banned: np.ndarray,
                 params: DecodingOptions) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may pick and their probabilities (ascending), after all the processors.

    `scores` [V] float32 is modified in place (callers pass a scratch buffer). seen: the distinct
    decoder tokens so far; banned: the ids that may not come next.
    """
    scores[banned] = -np.inf
    penalize(scores, seen, params.repetition_penalty)
    if 0 < params.top_k < scores.size:
        kth = scores[np.argpartition(scores, -params.top_k)[-params.top_k:]].min()
        candidates = np.flatnonzero(scores >= kth)  # ties with the k-th survive, as in transformers
    else:
        candidates = np.flatnonzero(np.isfinite(scores))
    values = scores[candidates].astype(np.float64) / params.temperature
    order = np.argsort(values, kind="stable")  # ascending, as transformers' top-p sorts
    candidates, values = candidates[order], values[order]
    probs = np.exp(values - values[-1])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = np.cumsum(probs) > 1 - params.top_p
        keep[-1] = True
        candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
    return candidates, probs


def next_token(scores: np.ndarray, seen: np.ndarray, banned: np.ndarray, params: DecodingOptions,
               rng: np.random.Generator | None) -> int:
    """The next token id: argmax of the penalized scores (greedy), or a draw from `distribution`.

    `scores` is modified in place, as in `distribution`.
    """
    if not params.do_sample:
        scores[banned] = -np.inf
        penalize(scores, seen, params.repetition_penalty)
        return int(scores.argmax())
    if rng is None:
        raise ValueError("sampling needs a random generator (pass seed=..., or do_sample=False)")
    candidates, probs = distribution(scores, seen, banned, params)
    cumulative = np.cumsum(probs)
    pick = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
    return int(candidates[min(pick, candidates.size - 1)])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()
