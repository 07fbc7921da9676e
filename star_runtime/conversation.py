"""One conversation: its history, the safety checks, and a streamed reply per user message.

The encoder input is built as in training (star_training.data, thu-coai's strat inputter):

    items  = [situation] + turns      user turns as their tokens, the model's own replies as
                                      [strategy token] + response tokens
    source = (item_1 + [__end__] + item_2 + [__end__] + ... + item_n)[-160:]

Items that have scrolled out of the last 160 tokens are dropped, so a conversation's memory is
bounded however long it runs.

Safety (star_runtime.safety), on every channel the same way:

    situation   checked when the conversation starts; in crisis, `situation_reply()` (or else
                the first `reply`) is the crisis reply, and the whole conversation is screened
                as a crisis
    message     checked before the model runs; in crisis, the crisis reply instead of the model
    model reply screened before anyone sees it: streamed text is held back and screened first
                (safety.stream.ScreenedStream), so `on_token` never receives text the screen
                rejects; on a hit decoding stops and the crisis reply is returned

Either way the reply is `escalated`, `escalation` says what triggered it and its category, and the
fixed text does not enter the model's context (its resource lines would fill the 160 tokens); the
user's message does.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from star_runtime.decoding import generate
from star_runtime.detok import readable
from star_runtime.safety import SafetyVerdict
from star_runtime.safety.stream import ScreenedStream
from star_runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from star_runtime.runtime import Runtime


TRIGGERS = ("user_message", "situation", "model_reply")


@dataclass(frozen=True)
class Escalation:
    """Why the safety layer answered: what triggered it, the category (its crisis resources), the
    signal (the rules section: "plan", "overdose_taken", ...) and the phrase, for logs."""

    trigger: str  # one of TRIGGERS
    category: str  # one of star_runtime.safety.CATEGORIES
    signal: str | None = None
    matched: str | None = field(default=None, repr=False)  # health data: keep it out of logs by default

    @classmethod
    def of(cls, trigger: str, verdict: SafetyVerdict) -> Escalation:
        return cls(trigger, verdict.category or "suicide_self_harm", verdict.signal, verdict.matched)


@dataclass(frozen=True)
class Reply:
    """What `Conversation.reply` returns.

    strategy: the strategy's name ("Question", ...; None when the safety layer answered without
    the model); strategy_probs: name -> probability; timings: milliseconds (see
    decoding.Timings.as_dict) plus "reply_ms", the whole call; escalated: the safety layer
    answered or replaced the model's reply, and `escalation` says why.
    """

    text: str
    strategy: str | None
    strategy_probs: dict[str, float]
    timings: dict[str, float]
    escalated: bool = False
    tokens: tuple[int, ...] = field(default=(), repr=False)  # the response ids (the model's)
    escalation: Escalation | None = None


def _blank(text: str) -> bool:
    """Nothing a person can see: whitespace, control and format characters (zero-width space and
    joiner, bidi marks) only."""
    return not "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf")).strip()


def clean_message(text: object) -> str:
    """The message with control characters turned into spaces.

    ValueError if nothing is left, or if it is binary data: more than a quarter of its visible
    characters are NUL or U+FFFD (what star-chat reads for bytes that are not UTF-8). Binary
    files are 45-56% such characters (measured on an ELF binary, a PNG, a gzip file and the
    bundle's weights); Latin-1 text from a terminal not set to UTF-8 has one per accented letter
    (1 of 29 in the test's French sentence), so it is still answered."""
    if not isinstance(text, str):
        raise ValueError(f"a message is text, not {type(text).__name__}")
    if _blank(text):
        raise ValueError("empty message")
    cleaned = "".join(" " if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text)
    visible = sum(not c.isspace() for c in text)
    binary = text.count("\ufffd") + text.count("\x00")
    if 4 * binary > visible:
        raise ValueError(f"binary data, not text: {binary} of its {visible} characters are NUL "
                         "or bytes that are not UTF-8")
    return cleaned


class Conversation:
    """History and decoding settings of one conversation. Not for sharing across threads."""

    def __init__(self, runtime: Runtime, situation: str | None, seed: int | None, params: SamplingParams,
                 max_new_tokens: int) -> None:
        if situation is not None and not isinstance(situation, str):
            raise TypeError(f"situation must be text or None, not {type(situation).__name__}")
        self.runtime, self.params, self.max_new_tokens = runtime, params, max_new_tokens
        self.rng = np.random.default_rng(seed)
        self.max_source = int(runtime.manifest["generation"]["max_source_length"])
        self._items: list[list[int]] = []
        self._crisis: str | None = None  # the category of the latest escalation, if any
        self._pending: Reply | None = None  # the situation's crisis reply, not yet delivered
        if situation is not None and not _blank(situation):
            verdict = runtime.safety.check_user(situation)
            if verdict.escalate:
                self._pending = self._escalated(Escalation.of("situation", verdict), time.perf_counter())
            self._items.append(runtime.tokenizer.encode(clean_message(situation)))

    @property
    def crisis_category(self) -> str | None:
        """The category of this conversation's latest escalation (None: none so far)."""
        return self._crisis

    def situation_reply(self) -> Reply | None:
        """The crisis reply for a situation in crisis, once (then None). An app shows it at the
        start; if it does not ask, the first `reply` returns it instead of the model's reply."""
        pending, self._pending = self._pending, None
        return pending

    def context_ids(self) -> list[int]:
        """The encoder input for the next reply: the items joined by __end__, last 160 tokens."""
        eos = self.runtime.manifest["special_ids"]["eos"]
        joined = [i for item in self._items for i in (*item, eos)][:-1]
        return joined[-self.max_source:]

    def _remember(self, item: list[int]) -> None:
        self._items.append(item)
        # Drop items wholly outside the window (each costs its length + 1 separator).
        total = sum(len(i) + 1 for i in self._items) - 1
        while len(self._items) > 1 and total - (len(self._items[0]) + 1) >= self.max_source:
            total -= len(self._items.pop(0)) + 1

    def _escalated(self, escalation: Escalation, start: float, model: tuple | None = None) -> Reply:
        """The crisis reply for `escalation`; the conversation is screened as a crisis from now on.
        model: (strategy, probs, tokens) when the model ran and its reply was replaced."""
        self._crisis = escalation.category
        text = self.runtime.safety.crisis_reply(escalation.category)
        strategy, probs, tokens = model if model is not None else (None, {}, ())
        return Reply(text, strategy, probs, {"reply_ms": (time.perf_counter() - start) * 1e3}, escalated=True,
                     tokens=tokens, escalation=escalation)

    def reply(self, text: str, on_token: Callable[[str], bool | None] | None = None) -> Reply:
        """Answer one user message. on_token(piece) gets the reply's text as it is generated, only
        after the safety screen has passed it; returning False stops the reply there.
        ValueError for an empty message or binary data."""
        start = time.perf_counter()
        rt = self.runtime
        cleaned = clean_message(text)  # ValueError for no text, a blank one or binary data
        # The check reads the message as written: the readings in safety.text undo escape
        # codes and control characters that clean_message turns into spaces.
        verdict = rt.safety.check_user(text)
        self._remember(rt.tokenizer.encode(cleaned))
        if verdict.escalate:
            self._pending = None
            return self._escalated(Escalation.of("user_message", verdict), start)
        if self._pending is not None:
            return self.situation_reply()

        stream = rt.tokenizer.create_stream()
        screen = ScreenedStream(rt.safety, on_token, crisis_category=self._crisis, render=readable)

        def callback(token_id: int) -> bool | None:
            piece = stream.decode(token_id)
            return screen.feed(piece) if piece else None

        gen = generate(rt.engine, self.context_ids(), self.params, max_new_tokens=self.max_new_tokens,
                       rng=self.rng, on_token=callback)
        # A reply cut off at max_new_tokens can end inside a word: its BPE mark "@@" (what
        # stream.flush() would give) is tokenizer bookkeeping, not text for a person.
        verdict = screen.finish(rt.tokenizer.decode(gen.tokens).removesuffix("@@"))
        reply_text = screen.text  # as written English (star_runtime.detok)
        labels = rt.manifest["strategies"]["labels"]
        probs = dict(zip(labels, map(float, gen.strategy_probs)))
        if verdict.escalate:
            return self._escalated(Escalation.of("model_reply", verdict), start,
                                   (labels[gen.strategy], probs, tuple(gen.tokens)))
        self._remember([rt.manifest["strategies"]["token_ids"][gen.strategy], *gen.tokens])
        timings = {**gen.timings.as_dict(), "reply_ms": (time.perf_counter() - start) * 1e3}
        return Reply(reply_text, labels[gen.strategy], probs, timings, tokens=tuple(gen.tokens))
