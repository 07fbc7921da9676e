"""An LLM writes the supporter's reply (star-eval --responder openai): SC+ of the paper's Table 3,
where STAR chooses the strategy, and the baseline where the LLM chooses it itself.

SC+ (strategy given): the LLM reads the conversation (star_training.dialogue_text), the
strategy's name and description (STRATEGY_DESCRIPTIONS, after the ESConv paper) and k examples
of that strategy from the train split, and answers with the reply alone.

Baseline (no strategy given): the LLM reads the 8 strategies with their descriptions and k
examples of any strategies, each labelled; it begins its answer with the strategy it chose in
brackets ("[Question] What happened?"). An answer that names none has strategy None (scored as
a miss by star_training.evaluation.score_replies).

Shots: every supporter turn of the train split after the first utterance is a shot, shown as
the utterance before it and the reply. For example i (in order) k distinct shots are drawn
with one random.Random(seed): of the example's strategy (SC+) or of any (baseline); k is cut
to what the train split holds. The same seed, examples and k give the same prompts, so the
answer cache serves a rerun.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from star_runtime.strategies import STRATEGIES, STRATEGY_DESCRIPTIONS, STRATEGY_NAMES
from star_training.data import SUPPORTER, Dialogue, Example
from star_training.dialogue_text import dialogue_text, speaker_label
from star_training.llm_client import ChatAnswer, ChatRequest, TokenCount

SYSTEM = ("You are the supporter in an emotional support conversation: you help a help-seeker who is going "
          "through a hard time. Your replies are short (one or two sentences), warm and natural.")


@dataclass(frozen=True)
class Shot:
    """One train-split supporter turn, as an example for the LLM."""

    before: tuple[str, str] | None  # (speaker, text) of the utterance before the reply
    strategy: int  # class id 0..7
    reply: str


def train_shots(conversations: Sequence[Dialogue]) -> list[Shot]:
    """Every supporter turn after the first utterance, with the utterance before it."""
    shots = []
    for conversation in conversations:
        for t, turn in enumerate(conversation.turns):
            if t > 0 and turn.speaker == SUPPORTER and turn.strategy is not None:
                prev = conversation.turns[t - 1]
                shots.append(Shot((prev.speaker, prev.text), turn.strategy, turn.text))
    return shots


class ShotSampler:
    """k distinct shots per call, of one strategy or of any, from one seeded generator."""

    def __init__(self, shots: Sequence[Shot], seed: int) -> None:
        self.rng = random.Random(seed)
        self.all = list(shots)
        self.by_strategy: dict[int, list[Shot]] = {}
        for shot in shots:
            self.by_strategy.setdefault(shot.strategy, []).append(shot)

    def draw(self, k: int, strategy: int | None = None) -> list[Shot]:
        pool = self.all if strategy is None else self.by_strategy.get(strategy, [])
        return self.rng.sample(pool, min(k, len(pool))) if k else []


def _strategy_line(k: int) -> str:
    return f"{STRATEGIES[k]} {STRATEGY_DESCRIPTIONS[k]}"


def _shot_text(shot: Shot, labelled: bool) -> str:
    lines = [f"{speaker_label(shot.before[0])}: {shot.before[1]}"] if shot.before else []
    lines.append(f"Supporter: {STRATEGIES[shot.strategy] + ' ' if labelled else ''}{shot.reply}")
    return "\n".join(lines)


def reply_request(example: Example, strategy: int | None, shots: Sequence[Shot], **settings: Any) -> ChatRequest:
    """The messages asking for the supporter's next reply to `example`'s context: with `strategy`
    (SC+) or letting the LLM choose one (None: the baseline)."""
    parts = []
    if strategy is None:
        parts.append("Support strategies you can use:\n" + "\n".join(_strategy_line(k) for k in range(len(STRATEGIES))))
    if shots:
        what = "of the strategy" if strategy is not None else "of supporter replies, each with its strategy"
        parts.append(f"Examples {what}, from other conversations:\n\n"
                     + "\n\n".join(_shot_text(s, labelled=strategy is None) for s in shots))
    parts.append("Conversation:\n" + dialogue_text(example.context, example.speakers, example.situation))
    if strategy is None:
        parts.append("Choose the most suitable strategy and write the supporter's next reply. Begin your answer with "
                     "the strategy's name in square brackets, then the reply, e.g. \"[Question] What happened?\"")
    else:
        parts.append(f"Write the supporter's next reply using the strategy {STRATEGIES[strategy]}: "
                     f"{STRATEGY_DESCRIPTIONS[strategy]} Answer with the reply only.")
    return ChatRequest.of([("system", SYSTEM), ("user", "\n\n".join(parts))], **settings)


_LABEL = re.compile(r"^\s*(?:supporter\s*:\s*)", re.IGNORECASE)
_CHOSEN = re.compile(r"^\s*(?:strategy\s*:\s*)?\[(" + "|".join(re.escape(n) for n in STRATEGY_NAMES) + r")\]\s*",
                     re.IGNORECASE)


def parse_reply(answer: str, chose: bool) -> tuple[int | None, str]:
    """(strategy the answer begins with, or None; the reply) from an LLM's answer. A leading
    "Supporter:" is dropped; `chose` is True when the LLM was asked to name a strategy."""
    text = _LABEL.sub("", answer.strip())
    if not chose:
        return None, " ".join(text.split())
    match = _CHOSEN.match(text)
    if match is None:
        return None, " ".join(text.split())
    name = next(n for n in STRATEGY_NAMES if n.lower() == match.group(1).lower())
    return STRATEGY_NAMES.index(name), " ".join(_LABEL.sub("", text[match.end():]).split())


def reply_requests(
    examples: Sequence[Example],
    sampler: ShotSampler,
    *,
    shots: int,
    strategies: Sequence[int] | None,
    settings: dict[str, Any],
) -> list[ChatRequest]:
    """One request per example, in order: with strategies[i] (SC+), or letting the LLM choose
    (strategies None); `shots` examples drawn for each from `sampler`."""
    requests = []
    for i, example in enumerate(examples):
        strategy = None if strategies is None else strategies[i]
        requests.append(reply_request(example, strategy, sampler.draw(shots, strategy), **settings))
    return requests


@dataclass
class LLMReplies:
    strategies: list[int | None]  # the given ones (SC+), or the LLM's choice (baseline)
    replies: list[str]
    tokens: TokenCount  # of every answer, cached or not
    from_cache: int  # answers that needed no request


def read_replies(answers: Sequence[ChatAnswer], strategies: Sequence[int] | None) -> LLMReplies:
    """The replies in `answers` (to reply_requests with the same `strategies`), and the strategy
    of each: the given one, or the one the LLM named (None when it named none)."""
    parsed = [parse_reply(a.text, chose=strategies is None) for a in answers]
    chosen = [s for s, _ in parsed] if strategies is None else list(strategies)
    return LLMReplies(chosen, [r for _, r in parsed], TokenCount.of(answers),
                      len({id(a) for a in answers if a.cached}))
