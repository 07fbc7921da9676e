"""The decoding loop: strategy first, then the response, token by token (as training/generate.py).

    run   = engine.start(context)                   encoder, once
    p     = softmax(strategy_logits(h_0))          position 0 reads __start__
    k     = argmax p  (or a forced class id)
    x_1   = strategy token k
    for t = 1 .. max_new_tokens:
        logits = LM head of h'_t                    position t reads x_t
        x_{t+1} = next_token(logits, seen, banned)  sampling.py; stops at __end__ (if stop_at_eos)

`steps` is the loop as a generator (one token id per `next`); `generate` runs it to the end with
an optional callback. Both are the low-level API the benchmarks use (ids in, ids out, fixed length
with stop_at_eos=False) and the one `Conversation` drives. `Timings` are measured with
`time.perf_counter` from the call's start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from star_runtime.sampling import DecodingOptions, next_token, softmax
from star_runtime.spec import BundleSpec

T, R = TypeVar("T"), TypeVar("R")


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
    """Milliseconds, each from the start of `generate` unless it says otherwise; 0 (and no
    token_ms) for what did not run, as when the safety layer answered without the model."""

    encoder_ms: float = 0.0  # the encoder and the cross-attention K/V
    strategy_ms: float = 0.0  # time to the strategy (encoder + decoder position 0)
    first_token_ms: float = 0.0  # time to the first response token
    token_ms: list[float] = field(default_factory=list)  # each response token's own time (step + choice)
    total_ms: float = 0.0
    reply_ms: float = 0.0  # Conversation only: the whole call, the safety checks included

    @property
    def per_token_ms(self) -> float:
        """Mean time per response token (0 when there was none)."""
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"encoder_ms": self.encoder_ms, "strategy_ms": self.strategy_ms,
                "first_token_ms": self.first_token_ms, "per_token_ms": self.per_token_ms,
                "total_ms": self.total_ms, "tokens": len(self.token_ms), "reply_ms": self.reply_ms}


@dataclass
class Generation:
    """What `generate` returns: ids and arrays (Conversation's Reply has the labels and text)."""

    strategy_id: int  # class id, predicted or forced
    strategy_probs: np.ndarray  # [n_strategies] the model's softmax, also when forced
    tokens: list[int]  # response ids, without __end__
    stopped: bool  # the on_token callback asked to stop
    timings: Timings


def banned_ids(spec: BundleSpec, *, with_eos: bool) -> np.ndarray:
    """Ids never allowed inside a response: strategy tokens, padding, __start__ (and __end__)."""
    ids = [*spec.strategy_token_ids, spec.pad_id, spec.bos_id]
    return np.array(ids + [spec.eos_id] if with_eos else ids, dtype=np.int64)


def stops(answer: object) -> bool:
    """The one stop rule of every streaming callback (`on_token` of `generate` and of
    `Conversation.reply`): returning False stops decoding after that token; None (a callback
    that returns nothing) or True go on."""
    return answer is False


class Run(Protocol):
    """One sequence being decoded (star_runtime.engine.DecodeRun, or a row of a batch)."""

    position: int
    logits: np.ndarray  # [V_out] after `step`: the LM head's, for the tokens Decoder.output_ids names
    hidden: np.ndarray  # [d] after `step`

    def step(self, token_id: int) -> np.ndarray: ...
    def close(self) -> None: ...


class Decoder(Protocol):
    """What decodes: an Engine (one sequence per step) or a batching.StepBatcher (many)."""

    spec: BundleSpec
    strategy_logits: Callable[[np.ndarray], np.ndarray]
    output_ids: np.ndarray  # [V_out]: logit k is token output_ids[k]

    def to_output(self, ids: np.ndarray) -> np.ndarray: ...
    def start(self, context_ids: np.ndarray, capacity: int | None = None) -> Run: ...


def steps(
    engine: Decoder,
    context_ids: Sequence[int] | np.ndarray,
    options: DecodingOptions,
    *,
    min_new_tokens: int = 0,
    stop_at_eos: bool = True,
    rng: np.random.Generator | None = None,
    forced_strategy: int | None = None,
) -> Generator[int, bool | None, Generation]:
    """The decoding loop as a generator: yields each response token id and returns the Generation.

    Predicts the strategy for `context_ids` (already cut to the source length), then decodes up
    to options.max_new_tokens tokens. `send(True)` after a token stops there (`stopped`); `next`
    goes on. stop_at_eos=False bans __end__, so the reply has exactly max_new_tokens tokens
    (benchmarks). max_new_tokens <= max_positions - 1: positions 0 and 1 read __start__ and the
    strategy token, response token t (from 0) is chosen at position t + 1. ValueError for bad
    arguments (raised at the first `next`); NonFiniteOutputError (a RuntimeError) when the model's
    logits are not finite.
    """
    spec = engine.spec
    max_new_tokens, limit = options.max_new_tokens, spec.max_new_tokens
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, (int, np.integer)):
        raise ValueError(f"min_new_tokens must be an integer, not {min_new_tokens!r}")
    if not 0 <= min_new_tokens <= max_new_tokens <= limit:
        raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens <= {limit} (the model's position table holds "
                         f"{limit + 1} positions), got {min_new_tokens} and {max_new_tokens}")
    n_strategies = len(spec.strategy_token_ids)
    if forced_strategy is not None and not (
            isinstance(forced_strategy, (int, np.integer)) and not isinstance(forced_strategy, (bool, np.bool_))
            and 0 <= forced_strategy < n_strategies):
        raise ValueError(f"forced_strategy must be a class id in 0..{n_strategies - 1}, not {forced_strategy!r}")
    context = np.asarray(context_ids, dtype=np.int64).reshape(1, -1)
    if context.shape[1] == 0:
        raise ValueError("the context is empty: at least one token is needed")
    if context.min() < 0 or context.max() >= spec.vocab_size:
        raise ValueError(f"context token ids must be in 0..{spec.vocab_size - 1}")
    timings, start = Timings(), time.perf_counter()
    ms = lambda t: (t - start) * 1e3  # noqa: E731

    run = engine.start(context, capacity=max_new_tokens + 1)  # positions 0 .. max_new_tokens
    try:
        return (yield from _decode(run, engine, options, forced_strategy, min_new_tokens, stop_at_eos, rng,
                                   timings, ms))
    finally:
        run.close()  # a batched run gives its row back, also when the caller stops iterating


def _decode(run: Run, engine: Decoder, options: DecodingOptions, forced_strategy: int | None, min_new_tokens: int,
            stop_at_eos: bool, rng: np.random.Generator | None, timings: Timings,
            ms: Callable[[float], float]) -> Generator[int, bool | None, Generation]:
    spec, clock = engine.spec, time.perf_counter
    strategy_ids, max_new_tokens = spec.strategy_token_ids, options.max_new_tokens
    timings.encoder_ms = ms(clock())
    run.step(spec.bos_id)
    strategy_logits = engine.strategy_logits(run.hidden)
    _check_finite(strategy_logits, "strategy logits")
    probs = softmax(strategy_logits)
    strategy = int(strategy_logits.argmax()) if forced_strategy is None else int(forced_strategy)
    timings.strategy_ms = ms(clock())

    # Choices are made among the LM head's logits (its k-th is token output_ids[k]): the banned
    # and seen ids it has no logit for need no ban and no penalty.
    to_output, output_ids = engine.to_output, engine.output_ids
    banned = to_output(banned_ids(spec, with_eos=False))
    banned_eos = to_output(banned_ids(spec, with_eos=True))
    seen = {spec.bos_id, strategy_ids[strategy]}
    token, tokens, stopped = strategy_ids[strategy], [], False
    for t in range(max_new_tokens):
        t0 = clock()
        logits = run.step(token)
        _check_finite(logits, "next-token logits")
        ban = banned_eos if (t < min_new_tokens or not stop_at_eos) else banned
        choice = next_token(logits, to_output(np.fromiter(seen, np.int64, len(seen))), ban, options, rng)
        token = int(output_ids[choice])
        timings.token_ms.append((clock() - t0) * 1e3)
        if t == 0:
            timings.first_token_ms = ms(clock())
        if token == spec.eos_id:
            break
        tokens.append(token)
        seen.add(token)
        if (yield token):
            stopped = True
            break
    timings.total_ms = ms(clock())
    return Generation(strategy, probs, tokens, stopped, timings)


def drive(loop: Generator[T, bool | None, R], on_item: Callable[[T], bool | None] | None) -> R:
    """Run a decoding generator to its end, passing each item to `on_item` (the stop rule: `stops`)."""
    try:
        item = next(loop)
        while True:
            item = loop.send(on_item is not None and stops(on_item(item)))
    except StopIteration as done:
        return done.value


def generate(engine: Decoder, context_ids: Sequence[int] | np.ndarray, options: DecodingOptions, *,
             on_token: Callable[[int], bool | None] | None = None, **settings: Any) -> Generation:
    """`steps` (its keyword settings: min_new_tokens, stop_at_eos, rng, forced_strategy) run to
    the end, on_token(token_id) called after each response token (False stops)."""
    return drive(steps(engine, context_ids, options, **settings), on_token)
