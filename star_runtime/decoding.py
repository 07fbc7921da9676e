"""The decoding loop: strategy first, then the response, token by token (as training/generate.py).

    run   = engine.start(context)                   encoder, once
    p     = softmax(strategy_logits(h_0))          position 0 reads __start__
    k     = argmax p  (or a forced class id)
    x_1   = strategy token k
    for t = 1 .. max_new_tokens:
        logits = LM head of h'_t                    position t reads x_t
        x_{t+1} = next_token(logits, seen, banned)  sampling.py; stops at __end__ (if stop_at_eos)

`generate` is the low-level API the benchmarks use (ids in, ids out, fixed length with
stop_at_eos=False) and the one `Conversation.reply` calls. Its `Timings` are measured with
`time.perf_counter` from the call's start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from star_runtime.engine import Engine
from star_runtime.sampling import SamplingParams, next_token, softmax


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or infinite logits: its weights are broken (all-NaN weights, an
    overflow in a float16 bundle), and no token can be chosen from them."""


def _check_finite(values: np.ndarray, what: str) -> None:
    # One pass over V = 54,952 float32 values: 14 us measured on the 2-core dev machine, against
    # 1.5 ms per response token of the default int8 bundle (1%).
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise NonFiniteOutputError(
            f"the model's {what} hold {bad} NaN or infinite values of {values.size}: the bundle's weights are "
            "broken; re-export it from a checkpoint that trained without NaN (star-export validates it)"
        )


@dataclass
class Timings:
    """Milliseconds, each from the start of `generate` unless it says otherwise."""

    encoder_ms: float = 0.0  # the encoder and the cross-attention K/V
    strategy_ms: float = 0.0  # time to the strategy (encoder + decoder position 0)
    first_token_ms: float = 0.0  # time to the first response token
    token_ms: list[float] = field(default_factory=list)  # each response token's own time (step + choice)
    total_ms: float = 0.0

    @property
    def per_token_ms(self) -> float:
        """Mean time per response token (0 when there was none)."""
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"encoder_ms": self.encoder_ms, "strategy_ms": self.strategy_ms,
                "first_token_ms": self.first_token_ms, "per_token_ms": self.per_token_ms,
                "total_ms": self.total_ms, "tokens": len(self.token_ms)}


@dataclass
class Generation:
    strategy: int  # class id, predicted or forced
    strategy_probs: np.ndarray  # [n_strategies] the model's softmax, also when forced
    tokens: list[int]  # response ids, without __end__
    stopped: bool  # the on_token callback asked to stop
    timings: Timings


def banned_ids(manifest: dict, *, with_eos: bool) -> np.ndarray:
    """Ids never allowed inside a response: strategy tokens, padding, __start__ (and __end__)."""
    special = manifest["special_ids"]
    ids = [*manifest["strategies"]["token_ids"], special["pad"], special["bos"]]
    return np.array(ids + [special["eos"]] if with_eos else ids, dtype=np.int64)


def generate(
    engine: Engine,
    context_ids: Sequence[int] | np.ndarray,
    params: SamplingParams,
    *,
    max_new_tokens: int = 40,
    min_new_tokens: int = 0,
    stop_at_eos: bool = True,
    rng: np.random.Generator | None = None,
    forced_strategy: int | None = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> Generation:
    """Predict the strategy for `context_ids` (already cut to the source length) and decode a reply.

    on_token(token_id) is called after each response token; returning False stops decoding.
    stop_at_eos=False bans __end__, so the reply has exactly max_new_tokens tokens (benchmarks).
    max_new_tokens <= max_positions - 1: positions 0 and 1 read __start__ and the strategy token,
    response token t (from 0) is chosen at position t + 1. NonFiniteOutputError (a RuntimeError)
    when the model's logits are not finite.
    """
    manifest = engine.manifest
    limit = int(manifest["io"].get("max_positions", manifest["model_config"]["max_position_embeddings"])) - 1
    for name, value in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if not 0 <= min_new_tokens <= max_new_tokens <= limit:
        raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens <= {limit} (the model's position table holds "
                         f"{limit + 1} positions), got {min_new_tokens} and {max_new_tokens}")
    special, strategy_ids = manifest["special_ids"], manifest["strategies"]["token_ids"]
    context = np.asarray(context_ids, dtype=np.int64).reshape(1, -1)
    if context.shape[1] == 0:
        raise ValueError("the context is empty: at least one token is needed")
    if context.min() < 0 or context.max() >= manifest["io"]["vocab_size"]:
        raise ValueError(f"context token ids must be in 0..{manifest['io']['vocab_size'] - 1}")
    clock, timings = time.perf_counter, Timings()
    start = clock()
    ms = lambda t: (t - start) * 1e3  # noqa: E731

    run = engine.start(context)
    timings.encoder_ms = ms(clock())
    run.step(special["bos"])
    strategy_logits = engine.strategy_logits(run.hidden)
    _check_finite(strategy_logits, "strategy logits")
    probs = softmax(strategy_logits)
    if forced_strategy is None:
        strategy = int(strategy_logits.argmax())
    elif (isinstance(forced_strategy, (int, np.integer)) and not isinstance(forced_strategy, (bool, np.bool_))
          and 0 <= forced_strategy < len(strategy_ids)):
        strategy = int(forced_strategy)
    else:
        raise ValueError(f"forced_strategy must be a class id in 0..{len(strategy_ids) - 1}, not {forced_strategy!r}")
    timings.strategy_ms = ms(clock())

    banned, banned_eos = banned_ids(manifest, with_eos=False), banned_ids(manifest, with_eos=True)
    seen = {special["bos"], strategy_ids[strategy]}
    token, tokens, stopped = strategy_ids[strategy], [], False
    for t in range(max_new_tokens):
        t0 = clock()
        logits = run.step(token)
        _check_finite(logits, "next-token logits")
        ban = banned_eos if (t < min_new_tokens or not stop_at_eos) else banned
        token = next_token(logits, np.fromiter(seen, np.int64, len(seen)), ban, params, rng)
        timings.token_ms.append((clock() - t0) * 1e3)
        if t == 0:
            timings.first_token_ms = ms(clock())
        if token == special["eos"]:
            break
        tokens.append(token)
        seen.add(token)
        if on_token is not None and on_token(token) is False:
            stopped = True
            break
    timings.total_ms = ms(clock())
    return Generation(strategy, probs, tokens, stopped, timings)
