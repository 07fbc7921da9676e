"""One conversation: its history, the safety checks, and a streamed reply per user message.

The encoder input is built as in training (star_training.data, thu-coai's strat inputter):

    items  = [situation] + turns      user turns as their tokens, the model's own replies as
                                      [strategy token] + response tokens
    source = (item_1 + [__end__] + item_2 + [__end__] + ... + item_n)[-160:]

Items that have scrolled out of the last 160 tokens are dropped, so a conversation's memory is
bounded however long it runs.

Safety (star_runtime.safety): a user message in crisis gets the fixed crisis reply without
running the model; a model reply that the screen rejects is replaced by it. Either way the
reply is `escalated`, and the fixed text does not enter the model's context (its resource lines
would fill the 160 tokens); the user's message does.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from star_runtime.decoding import generate
from star_runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from star_runtime.runtime import Runtime


@dataclass(frozen=True)
class Reply:
    """What `Conversation.reply` returns.

    strategy: the strategy's name ("Question", ...; None when the safety layer answered without
    the model); strategy_probs: name -> probability; timings: milliseconds (see
    decoding.Timings.as_dict) plus "reply_ms", the whole call; escalated: the safety layer
    answered or replaced the model's reply.
    """

    text: str
    strategy: str | None
    strategy_probs: dict[str, float]
    timings: dict[str, float]
    escalated: bool = False
    tokens: tuple[int, ...] = field(default=(), repr=False)  # the response ids (the model's)


def clean_message(text: object) -> str:
    """The message with control characters turned into spaces.

    ValueError if nothing is left, or if it is binary data: more than a quarter of its visible
    characters are NUL or U+FFFD (what star-chat reads for bytes that are not UTF-8). Binary
    files are 45-56% such characters (measured on an ELF binary, a PNG, a gzip file and the
    bundle's weights); Latin-1 text from a terminal not set to UTF-8 has one per accented letter
    (1 of 29 in the test's French sentence), so it is still answered."""
    if not isinstance(text, str):
        raise ValueError(f"a message is text, not {type(text).__name__}")
    cleaned = "".join(" " if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text)
    if not cleaned.strip():
        raise ValueError("empty message")
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
        self.runtime, self.params, self.max_new_tokens = runtime, params, max_new_tokens
        self.rng = np.random.default_rng(seed)
        self.max_source = int(runtime.manifest["generation"]["max_source_length"])
        self._items: list[list[int]] = []
        self._in_crisis = False
        if situation is not None and situation.strip():
            self._items.append(runtime.tokenizer.encode(clean_message(situation)))

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

    def reply(self, text: str, on_token: Callable[[str], bool | None] | None = None) -> Reply:
        """Answer one user message. on_token(piece) gets the reply's text as it is generated;
        returning False stops the reply there. ValueError for an empty message."""
        start = time.perf_counter()
        rt = self.runtime
        text = clean_message(text)
        user = rt.tokenizer.encode(text)
        self._remember(user)
        verdict = rt.safety.check_user(text)
        if verdict.escalate:
            self._in_crisis = True
            return Reply(rt.safety.crisis_reply(), None, {}, {"reply_ms": (time.perf_counter() - start) * 1e3},
                         escalated=True)

        stream = rt.tokenizer.create_stream()
        callback = None
        if on_token is not None:
            def callback(token_id: int) -> bool | None:
                piece = stream.decode(token_id)
                return on_token(piece) if piece else None

        gen = generate(rt.engine, self.context_ids(), self.params, max_new_tokens=self.max_new_tokens,
                       rng=self.rng, on_token=callback)
        # A reply cut off at max_new_tokens can end inside a word: its BPE mark "@@" (what
        # stream.flush() would give) is tokenizer bookkeeping, not text for a person.
        reply_text = rt.tokenizer.decode(gen.tokens).removesuffix("@@")
        screened, replaced = rt.safety.screen_model(reply_text, crisis_context=self._in_crisis)
        labels = rt.manifest["strategies"]["labels"]
        if not replaced:
            self._remember([rt.manifest["strategies"]["token_ids"][gen.strategy], *gen.tokens])
        timings = {**gen.timings.as_dict(), "reply_ms": (time.perf_counter() - start) * 1e3}
        return Reply(screened, labels[gen.strategy], dict(zip(labels, map(float, gen.strategy_probs))), timings,
                     escalated=replaced, tokens=tuple(gen.tokens))
