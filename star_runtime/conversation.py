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

History, for callers that keep no conversation object (a server, an app process that restarts):
`history()` reads the messages back, and `Runtime.conversation(history=...)` rebuilds the
conversation from them, so that its next reply reads the context a conversation that was never
interrupted would read:

    message                       {"role": "user" | "assistant", "content": str,
                                   "strategy": label | None}       (strategy: assistant only, optional)
    user                          its tokens (checked by the safety layer, as `reply` does)
    assistant, a crisis reply     (its text is one of the policy's crisis replies) left out of the
                                  context, as when it was given; the conversation is a crisis from there
    assistant, a model reply      [strategy token] + its tokens; the strategy is the message's
                                  "strategy", else predicted from the context before it (what
                                  `reply` chose there: the strategy is the argmax, not sampled),
                                  else (nothing before it) none

A crisis in the history that no crisis reply of its category answered later in it (the situation,
or an earlier user message: a history written elsewhere, or edited) is not passed over: the next
reply is its crisis reply, trigger "situation" or "history". Of several, the first category of
star_runtime.safety.CATEGORIES (a body in danger first). The sampling seed starts afresh: a
rebuilt conversation gives the replies of a new one with that seed on the same context.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from star_runtime.decoding import Generation, Timings, drive, generate, steps
from star_runtime.detok import readable
from star_runtime.safety import CATEGORIES, SafetyVerdict
from star_runtime.safety.stream import ScreenedStream
from star_runtime.sampling import DecodingOptions

if TYPE_CHECKING:
    from star_runtime.runtime import Runtime


# "history": an earlier user message of a rebuilt conversation that no crisis reply answered.
TRIGGERS = ("user_message", "situation", "model_reply", "history")
ROLES = ("user", "assistant")


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
    the model); strategy_probs: name -> probability ({} without the model); timings: the
    decoding's (decoding.Timings, zeros where the model did not run) and reply_ms, the whole
    call; escalated: the safety layer answered or replaced the model's reply, and `escalation`
    says why; stopped: the app's callback (or `ReplyStream.stop`) ended the reply early.
    """

    text: str
    strategy: str | None
    strategy_probs: dict[str, float]
    timings: Timings
    escalated: bool = False
    tokens: tuple[int, ...] = field(default=(), repr=False)  # the response ids (the model's)
    escalation: Escalation | None = None
    stopped: bool = False


class ReplyStream:
    """The iterator face of `Conversation.reply`: iterating gives the reply's text pieces as they
    pass the safety screen; `reply` is the Reply once the iteration has ended. `stop()` ends the
    reply after the last piece taken (what a callback returning False does) and returns it.

        stream = conv.stream("I can't sleep.")
        for piece in stream:
            print(piece, end="")
        stream.reply.strategy
    """

    def __init__(self, loop: Generator[str, bool | None, Reply]) -> None:
        self._loop = loop
        self._started = False
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return self._advance(stop=False)

    def _advance(self, *, stop: bool) -> str:
        if self.reply is not None:
            raise StopIteration
        try:
            piece = self._loop.send(stop) if self._started else next(self._loop)
        except StopIteration as done:
            self.reply = done.value
            raise StopIteration from None
        self._started = True
        return piece

    def stop(self) -> Reply:
        """End the reply here (nothing more is decoded or passed on) and return it."""
        try:
            self._advance(stop=self._started)
            while True:
                self._advance(stop=True)
        except StopIteration:
            pass
        assert self.reply is not None
        return self.reply


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
    """History and decoding settings of one conversation. Not for sharing across threads.

    history: messages to rebuild the conversation from (module docstring, "History"); ValueError
    or TypeError naming the message (`history[3]: ...`) for one that cannot be used.
    """

    def __init__(self, runtime: Runtime, situation: str | None, seed: int | None, params: DecodingOptions,
                 history: Sequence[Mapping[str, Any]] = ()) -> None:
        if situation is not None and not isinstance(situation, str):
            raise TypeError(f"situation must be text or None, not {type(situation).__name__}")
        self.runtime, self.params = runtime, params
        self.situation = situation
        self.rng = np.random.default_rng(seed)
        self.spec = runtime.spec
        self._items: list[list[int]] = []
        self._messages: list[dict[str, Any]] = []  # what history() returns
        self._crisis: str | None = None  # the category of the latest escalation, if any
        self._pending: Reply | None = None  # a crisis reply not yet delivered (the situation's, or the history's)
        if situation is not None and not _blank(situation):
            verdict = runtime.safety.check_user(situation)
            if verdict.escalate:
                self._pending = self._escalated(Escalation.of("situation", verdict), time.perf_counter())
            self._items.append(runtime.tokenizer.encode(clean_message(situation)))
        if history:
            self._rebuild(history)

    @property
    def crisis_category(self) -> str | None:
        """The category of this conversation's latest escalation (None: none so far)."""
        return self._crisis

    def history(self) -> list[dict[str, Any]]:
        """The messages so far, oldest first, for `Runtime.conversation(history=...)` (module
        docstring): {"role": "user", "content"} as the person wrote it, {"role": "assistant",
        "content", "strategy"} as the person was shown it (strategy None for a crisis reply).
        The situation is not among them: it is `self.situation`."""
        return [dict(m) for m in self._messages]

    def situation_reply(self) -> Reply | None:
        """The crisis reply for a situation in crisis (or a rebuilt history's unanswered crisis),
        once (then None). An app shows it at the start; if it does not ask, the first `reply`
        returns it instead of the model's reply."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._messages.append({"role": "assistant", "content": pending.text, "strategy": None})
        return pending

    def context_ids(self, message: str | None = None) -> list[int]:
        """The encoder input for the next reply: the items joined by __end__, last 160 tokens;
        with `message` (the next user message, cleaned), the input the reply to it reads."""
        eos = self.spec.eos_id
        items = self._items if message is None else [*self._items, self.runtime.tokenizer.encode(message)]
        joined = [i for item in items for i in (*item, eos)][:-1]
        return joined[-self.spec.max_source_length:]

    def _remember(self, item: list[int]) -> None:
        self._items.append(item)
        # Drop items wholly outside the window (each costs its length + 1 separator).
        total = sum(len(i) + 1 for i in self._items) - 1
        while len(self._items) > 1 and total - (len(self._items[0]) + 1) >= self.spec.max_source_length:
            total -= len(self._items.pop(0)) + 1

    def _crisis_reply(self, escalation: Escalation, start: float, model: tuple | None = None) -> Reply:
        """The crisis reply for `escalation`. model: (strategy, probs, tokens) when the model ran
        and its reply was replaced."""
        text = self.runtime.safety.crisis_reply(escalation.category)
        strategy, probs, tokens = model if model is not None else (None, {}, ())
        return Reply(text, strategy, probs, Timings(reply_ms=(time.perf_counter() - start) * 1e3), escalated=True,
                     tokens=tokens, escalation=escalation)

    def _escalated(self, escalation: Escalation, start: float, model: tuple | None = None) -> Reply:
        """The crisis reply for `escalation`; the conversation is screened as a crisis from now on."""
        self._crisis = escalation.category
        return self._crisis_reply(escalation, start, model)

    def _check(self, text: str, start: float) -> tuple[str, Reply | None]:
        """The cleaned message, and the crisis reply it gets instead of the model's (or None).

        A crisis in the message wins over one still pending (the situation's, the history's)
        unless the pending one's category comes first in CATEGORIES (a body in danger first).
        Changes nothing."""
        cleaned = clean_message(text)  # ValueError for no text, a blank one or binary data
        # The check reads the message as written: the readings in safety.text undo escape
        # codes and control characters that clean_message turns into spaces.
        verdict = self.runtime.safety.check_user(text)
        pending = self._pending
        if verdict.escalate:
            escalation = Escalation.of("user_message", verdict)
            if pending is None or CATEGORIES.index(escalation.category) <= CATEGORIES.index(
                    pending.escalation.category):
                return cleaned, self._crisis_reply(escalation, start)
        return cleaned, pending

    def strategy(self, text: str) -> Reply:
        """What `reply(text)` would choose, without decoding a reply or changing the conversation.

        The same checks as `reply`: a crisis gives the crisis Reply (escalated, strategy None);
        else a Reply with empty text, the predicted strategy and the model's distribution over
        the strategies (STAR as a strategy classifier for another model)."""
        start = time.perf_counter()
        cleaned, crisis = self._check(text, start)
        if crisis is not None:
            return crisis
        strategy, probs, timings = self._predict(self.context_ids(cleaned))
        timings.reply_ms = (time.perf_counter() - start) * 1e3
        return Reply("", strategy, probs, timings)

    def _predict(self, context: list[int]) -> tuple[str, dict[str, float], Timings]:
        """The strategy for `context` (encoder and decoder position 0 only), its distribution, timings."""
        gen = generate(self.runtime.decoder, context, self.params.but(max_new_tokens=0))
        labels = self.spec.strategy_labels
        return labels[gen.strategy_id], dict(zip(labels, map(float, gen.strategy_probs))), gen.timings

    def reply(self, text: str, on_token: Callable[[str], bool | None] | None = None) -> Reply:
        """Answer one user message. on_token(piece) gets the reply's text as it is generated, only
        after the safety screen has passed it; returning False stops the reply there (the one stop
        rule, decoding.stops). ValueError for an empty message or binary data."""
        return drive(self._replying(text), on_token)

    def stream(self, text: str) -> ReplyStream:
        """`reply` as an iterator over the screened text pieces (ReplyStream). The checks of the
        message run at the first `next`."""
        return ReplyStream(self._replying(text))

    def _replying(self, text: str) -> Generator[str, bool | None, Reply]:
        """The reply to `text` as a generator: yields screened pieces, `send(True)` stops, returns the Reply."""
        start = time.perf_counter()
        rt = self.runtime
        cleaned, crisis = self._check(text, start)
        self._remember(rt.tokenizer.encode(cleaned))
        self._messages.append({"role": "user", "content": text})
        if crisis is not None:
            self._pending = None
            self._crisis = crisis.escalation.category
            self._messages.append({"role": "assistant", "content": crisis.text, "strategy": None})
            return crisis

        pieces = rt.tokenizer.create_stream()
        released: list[str] = []
        screen = ScreenedStream(rt.safety, released.append, crisis_category=self._crisis, render=readable)
        loop = steps(rt.decoder, self.context_ids(), self.params, rng=self.rng)
        try:
            token = next(loop)
            while True:
                piece = pieces.decode(token)
                safe = screen.feed(piece) if piece else True
                stop = not safe
                for new in released:
                    stop = bool((yield new)) or stop
                released.clear()
                screen.app_stopped = screen.app_stopped or (stop and safe)
                token = loop.send(stop)
        except StopIteration as done:
            gen: Generation = done.value
        # A reply cut off at max_new_tokens can end inside a word: its BPE mark "@@" (what
        # pieces.flush() would give) is tokenizer bookkeeping, not text for a person.
        verdict = screen.finish(rt.tokenizer.decode(gen.tokens).removesuffix("@@"))
        for new in released:  # the rest, once the whole reply is screened (nothing left to stop)
            yield new
        labels = self.spec.strategy_labels
        strategy, probs = labels[gen.strategy_id], dict(zip(labels, map(float, gen.strategy_probs)))
        if verdict.escalate:
            reply = self._escalated(Escalation.of("model_reply", verdict), start, (strategy, probs, tuple(gen.tokens)))
            self._messages.append({"role": "assistant", "content": reply.text, "strategy": None})
            return reply
        self._remember([self.spec.strategy_token_ids[gen.strategy_id], *gen.tokens])
        self._messages.append({"role": "assistant", "content": screen.text, "strategy": strategy})
        gen.timings.reply_ms = (time.perf_counter() - start) * 1e3
        return Reply(screen.text, strategy, probs, gen.timings, tokens=tuple(gen.tokens), stopped=gen.stopped)

    # -- rebuilding from a history (module docstring, "History") --------------------------------

    def _rebuild(self, history: Sequence[Mapping[str, Any]]) -> None:
        rt = self.runtime
        if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
            raise TypeError(f"history must be a list of messages, not {type(history).__name__}")
        start = time.perf_counter()
        labels = self.spec.strategy_labels
        # Which category each crisis reply answers (two categories may share a text).
        crisis_texts: dict[str, set[str]] = {}
        for category in CATEGORIES:
            crisis_texts.setdefault(rt.safety.crisis_reply(category).strip(), set()).add(category)
        unanswered: list[Escalation] = [] if self._pending is None else [self._pending.escalation]
        self._pending = None
        for i, message in enumerate(history):
            role, content, strategy = _message(message, i, labels)
            try:
                cleaned = clean_message(content)
            except ValueError as err:
                raise ValueError(f"history[{i}]: {err}") from None
            if role == "user":
                verdict = rt.safety.check_user(content)
                if verdict.escalate:
                    unanswered.append(Escalation.of("history", verdict))
                    self._crisis = verdict.category
                self._remember(rt.tokenizer.encode(cleaned))
            elif (answered := crisis_texts.get(content.strip())) is not None:
                unanswered = [e for e in unanswered if e.category not in answered]
                self._crisis = next(c for c in CATEGORIES if c in answered)
                strategy = None  # the safety layer's, not the model's
            else:
                if strategy is None and self._items:
                    strategy = self._predict(self.context_ids())[0]
                tokens = rt.tokenizer.encode(cleaned)
                if strategy is not None:
                    tokens.insert(0, self.spec.strategy_token_ids[labels.index(strategy)])
                self._remember(tokens)
            self._messages.append({"role": role, "content": content}
                                  | ({"strategy": strategy} if role == "assistant" else {}))
        if unanswered:
            first = min(unanswered, key=lambda e: CATEGORIES.index(e.category))  # min keeps the earliest of a tie
            self._pending = self._escalated(first, start)


def _message(message: object, i: int, labels: Sequence[str]) -> tuple[str, str, str | None]:
    """(role, content, strategy) of history[i], or TypeError / ValueError naming it."""
    if not isinstance(message, Mapping):
        raise TypeError(f"history[{i}] must be a mapping with \"role\" and \"content\", not {type(message).__name__}")
    role, content, strategy = message.get("role"), message.get("content"), message.get("strategy")
    if role not in ROLES:
        raise ValueError(f"history[{i}]: role must be one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(content, str):
        raise TypeError(f"history[{i}]: content must be text, not {type(content).__name__}")
    if strategy is not None and (role != "assistant" or strategy not in labels):
        raise ValueError(f"history[{i}]: strategy must be one of the bundle's strategies ({', '.join(labels)}) "
                         f"on an assistant message, not {strategy!r}")
    return role, content, strategy
