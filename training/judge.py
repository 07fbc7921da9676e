"""The Emotional Generation Score (EGS): an LLM judge rates each reply on four criteria.

    C1  relevance: the reply fits the conversation and what the help-seeker said
    C2  no negative emotion toward anyone (the help-seeker or others)
    C3  positive emotion and support for the help-seeker
    C4  positive impact on the conversation

each an integer 1..10, answered as a JSON object {"C1": n, "C2": n, "C3": n, "C4": n}. Per reply
i with all four parsed:

    EGS_i = (C1_i + C2_i + C3_i + C4_i) / 4

For each criterion and for EGS we report the mean over the parsed replies with a 95% t-interval
(star_training.intervals: mean +- t_{0.975, n-1} s / sqrt(n)), over all replies and per strategy.
An answer that does not parse counts in no mean; too many of them and no report is made.

Our decisions, where the paper's text is not at hand (SPEC.md does not carry its Table 5):
JUDGE_PROMPT is a reconstruction from the four criteria, not the paper's exact wording, and EGS
is the mean of the four criteria (on the criteria's 1-10 scale). The prompt's sha256 goes into
every report, so scores from two prompts are never mixed unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from star_training.dialogue_text import dialogue_text
from star_training.intervals import Interval, t_interval
from star_training.llm_client import ChatRequest

CRITERIA: dict[str, str] = {
    "C1": "Relevance: the reply is relevant to the conversation and responds to what the help-seeker said.",
    "C2": "No negative emotion: the reply expresses no negative emotion toward anyone, neither the "
          "help-seeker nor anyone else.",
    "C3": "Positive emotion and support: the reply expresses positive emotion and gives the help-seeker "
          "emotional support.",
    "C4": "Positive impact: the reply has a positive impact on the conversation.",
}
EGS = "egs"  # the key of the overall score beside C1..C4
LOWEST, HIGHEST = 1, 10

JUDGE_SYSTEM = ("You are an expert in emotional support conversations. You rate a supporter's reply fairly and "
                "consistently.")
JUDGE_PROMPT = """\
Below is an emotional support conversation between a help-seeker and a supporter, then the supporter's next reply.

Conversation:
{dialogue}

Reply to rate:
Supporter: {reply}

Rate the reply on each criterion with an integer from {lowest} (worst) to {highest} (best):
{criteria}

Answer with one JSON object and nothing else, in this form:
{{"C1": <{lowest}-{highest}>, "C2": <{lowest}-{highest}>, "C3": <{lowest}-{highest}>, "C4": <{lowest}-{highest}>}}"""
PROMPT_SHA256 = hashlib.sha256((JUDGE_SYSTEM + "\n" + JUDGE_PROMPT + json.dumps(CRITERIA)).encode()).hexdigest()

# The reply to judge: the first of these fields a record has (star-eval's predictions carry
# "hypothesis_readable", the reply as a person reads it); --reply-field picks another.
REPLY_FIELDS = ("hypothesis_readable", "hypothesis", "reply", "response")
STRATEGY_FIELDS = ("predicted_strategy", "strategy")


class JudgeInputError(ValueError):
    """A predictions file the judge cannot read; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    """One reply to judge, with what the judge reads about it."""

    line: int  # 1-based line in the input file
    context: tuple[str, ...]
    speakers: tuple[str, ...]  # one per context utterance, or () when the file has none
    situation: str
    reply: str
    strategy: str | None  # the strategy the reply was written with, when the file says


def _context(value: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Utterances and speakers from a list of strings, a list of {"speaker", "text"}, or a string."""
    if isinstance(value, str):
        return (value,), ()
    if isinstance(value, list) and all(isinstance(u, str) for u in value):
        return tuple(value), ()
    if isinstance(value, list) and all(isinstance(u, dict) and isinstance(u.get("text"), str)
                                       and isinstance(u.get("speaker"), str) for u in value):
        return tuple(u["text"] for u in value), tuple(u["speaker"] for u in value)
    raise JudgeInputError(f"{where}: \"context\" must be a string, a list of strings, or a list of "
                          "{\"speaker\": ..., \"text\": ...}")


def read_items(path: Path, reply_field: str | None = None) -> list[Item]:
    """The records of a JSON Lines file (star-eval's predictions.jsonl, or any file of
    {"context": ..., "reply": ...}): context, optional "speakers", "situation" and strategy, and
    the reply from `reply_field` or the first of REPLY_FIELDS. Blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JudgeInputError(f"{path}: no such file; give star-eval's predictions.jsonl or a JSON Lines file of "
                              "{\"context\": ..., \"reply\": ...}") from None
    except IsADirectoryError:
        raise JudgeInputError(f"{path} is a folder; give its predictions.jsonl") from None
    except UnicodeDecodeError:
        raise JudgeInputError(f"{path}: not UTF-8 text; give a JSON Lines file") from None
    fields = (reply_field,) if reply_field else REPLY_FIELDS
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise JudgeInputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise JudgeInputError(f"{where}: a JSON object was expected")
        if "context" not in record:
            raise JudgeInputError(f"{where}: no \"context\" field")
        context, speakers = _context(record["context"], where)
        if not speakers and isinstance(record.get("speakers"), list) and len(record["speakers"]) == len(context):
            speakers = tuple(str(s) for s in record["speakers"])
        reply = next((record[f] for f in fields if f in record), None)
        if not isinstance(reply, str):
            raise JudgeInputError(f"{where}: no reply: none of the fields {', '.join(fields)} holds a string"
                                  + ("" if reply_field else "; name the field with --reply-field"))
        strategy = next((record[f] for f in STRATEGY_FIELDS if isinstance(record.get(f), str)), None)
        situation = record.get("situation") if isinstance(record.get("situation"), str) else ""
        items.append(Item(n, context, speakers, situation, reply, strategy))
    if not items:
        raise JudgeInputError(f"{path}: no record to judge (the file is empty)")
    return items


def judge_request(item: Item, **settings: Any) -> ChatRequest:
    """The judge's messages for one reply (JUDGE_SYSTEM, then JUDGE_PROMPT filled in)."""
    prompt = JUDGE_PROMPT.format(
        dialogue=dialogue_text(item.context, item.speakers, item.situation), reply=item.reply,
        criteria="\n".join(f"{key}. {text}" for key, text in CRITERIA.items()), lowest=LOWEST, highest=HIGHEST)
    return ChatRequest.of([("system", JUDGE_SYSTEM), ("user", prompt)], **settings)


# -- parsing the judge's answer -------------------------------------------------------------------
class ParseError(ValueError):
    """An answer that is not the criteria's JSON; the message says what is wrong with it."""


_KEY = re.compile(r"\s*c\s*([1-4])(?![0-9]).*", re.IGNORECASE | re.DOTALL)  # "C1", "c1", "C1 (relevance)"


def _score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _criteria(obj: dict[str, Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    for key, value in obj.items():
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if not match:
            continue
        name = f"C{match.group(1)}"
        score = _score(value)
        if name in found:
            raise ParseError(f"{name} is given twice")
        if score is None:
            raise ParseError(f"{name} is {json.dumps(value)}, not an integer")
        if not LOWEST <= score <= HIGHEST:
            raise ParseError(f"{name} is {score}, outside {LOWEST}..{HIGHEST}")
        found[name] = score
    missing = [c for c in CRITERIA if c not in found]
    if missing:
        raise ParseError(f"no {', '.join(missing)} in the JSON object")
    return found


def parse_scores(answer: str) -> dict[str, int]:
    """C1..C4 from the judge's answer: the first JSON object in it that holds all four (a code
    fence or words around it are allowed; nested objects are searched too). ParseError otherwise."""
    decoder = json.JSONDecoder()
    error = ParseError("no JSON object in the answer")
    for match in re.finditer(r"\{", answer):
        try:
            obj, _ = decoder.raw_decode(answer, match.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            try:
                return _criteria(obj)
            except ParseError as exc:
                error = exc  # an inner object may still hold them
    raise error


# -- scoring -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Judgment:
    item: Item
    answer: str  # the judge's text as it came
    scores: dict[str, int] | None  # C1..C4, None when the answer did not parse
    error: str | None  # why it did not parse

    @property
    def egs(self) -> float | None:
        return None if self.scores is None else sum(self.scores.values()) / len(self.scores)


def judgment(item: Item, answer: str) -> Judgment:
    try:
        return Judgment(item, answer, parse_scores(answer), None)
    except ParseError as exc:
        return Judgment(item, answer, None, str(exc))


def _interval_dict(iv: Interval) -> dict[str, float | int | None]:
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def summary(judgments: Sequence[Judgment]) -> dict[str, dict[str, float | int | None]] | None:
    """For C1..C4 and EGS, the mean and 95% t-interval over the parsed judgments; None if none parsed."""
    parsed = [j for j in judgments if j.scores is not None]
    if not parsed:
        return None
    out = {c: _interval_dict(t_interval([float(j.scores[c]) for j in parsed])) for c in CRITERIA}  # type: ignore[index]
    out[EGS] = _interval_dict(t_interval([j.egs for j in parsed]))  # type: ignore[misc]
    return out


def by_strategy(judgments: Sequence[Judgment]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """summary() per strategy (the records' strategy field), strategies in first-seen order."""
    groups: dict[str, list[Judgment]] = {}
    for j in judgments:
        if j.item.strategy is not None:
            groups.setdefault(j.item.strategy, []).append(j)
    return {s: table for s, group in groups.items() if (table := summary(group)) is not None}


def cell(value: Any) -> str:
    """A table cell: "mean ± half-width" of an interval, the mean alone when n < 2, a count as is,
    any other number with two decimals."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        if value["low"] is None:
            return f"{value['mean']:.2f}"
        return f"{value['mean']:.2f} ± {(value['high'] - value['low']) / 2:.2f}"
    return f"{value:.2f}"


COLUMNS = (*((c, c) for c in CRITERIA), (EGS, "EGS"))
