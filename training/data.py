"""ESConv: conversations, the standard split, and the examples STAR trains on (SPEC section 2).

Sources `load_conversations` reads:
  - a folder with train.txt / valid.txt / test.txt (the Hugging Face `thu-coai/esconv` files: one
    conversation per line, speakers "usr" / "sys", a sys turn carries "strategy");
  - the original ESConv.json (a JSON list; speakers "seeker" / "supporter", `content`,
    `annotation.strategy`), split by the rule prior work uses: shuffle the list in file order with
    `random.seed(13)`, valid = first int(0.15 n) = 195, test = next 195, train = the other 910;
  - the name "thu-coai/esconv", downloaded from the Hugging Face hub (online only).
Texts are whitespace-normalised (`" ".join(s.strip().split())`, thu-coai's `_norm`).

Examples follow thu-coai's strat inputter (codes_zcj/inputters/strat.py), one per supporter turn
that is not the first utterance, with the situation as an extra first context item:

    context        = [situation] + utterances[:i], a supporter turn as [strategy] + its tokens
    input_ids      = (c_1 + [eos] + c_2 + [eos] + ... + c_n)[-max_source:]          (<= 160)
    labels         = ([strategy] + response + [eos])[: max_target + 1]              (<= 41)
    decoder_inputs = [bos] + labels[:-1]
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from star_runtime.strategies import STRATEGY_NAMES
from star_runtime.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")
HUB_DATASET = "thu-coai/esconv"
SEEKER, SUPPORTER = "seeker", "supporter"
_SPLIT_SEED = 13
_SPACE = re.compile(r"\s*")


class DataError(ValueError):
    """Bad ESConv input; the message names the file and line."""


@dataclass(frozen=True)
class Turn:
    speaker: str  # SEEKER or SUPPORTER in ESConv; any name in stage 0's corpora
    text: str
    strategy: int | None  # class id 0..7 (index in STRATEGIES) for a supporter turn, else None


@dataclass(frozen=True)
class Dialogue:
    """One conversation as training reads it: ESConv's, or a stage-0 corpus's (no situation, no
    strategies). star_runtime.conversation.Conversation is a live chat."""

    situation: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Example:
    """One supporter turn to predict, as token ids and as the plain texts evaluation reads."""

    conversation: int  # index of the conversation in the list given to build_examples
    turn: int  # index of the response in that conversation's turns (>= 1)
    input_ids: tuple[int, ...]  # encoder input, <= max_source
    decoder_input_ids: tuple[int, ...]  # [bos] + labels[:-1]
    labels: tuple[int, ...]  # [strategy token] + response + [eos], <= max_target + 1
    strategy: int | None  # class id 0..7; None for a language-model example (star_training.corpus)
    situation: str
    context: tuple[str, ...]  # earlier utterances, oldest first, without strategy tokens
    response: str
    # who said each context utterance (SEEKER / SUPPORTER): an LLM judge or responder reads the
    # dialogue with its speakers; empty where the source has none (language-model corpora)
    speakers: tuple[str, ...] = ()


def normalise_space(text: str) -> str:
    """thu-coai's `_norm`: runs of whitespace as one space, none at the ends."""
    return " ".join(text.strip().split())


def _field(obj: dict, key: str, kind: type, where: str) -> object:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise DataError(f"{where}: field {key!r} should be a {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _conversation(obj: object, where: str, original: bool) -> Dialogue:
    """One conversation from a split-file line (`original=False`) or an ESConv.json item."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    speakers = {"seeker": SEEKER, "supporter": SUPPORTER} if original else {"usr": SEEKER, "sys": SUPPORTER}
    turns = []
    for k, utterance in enumerate(_field(obj, "dialog", list, where)):
        at = f"{where}: dialog[{k}]"
        if not isinstance(utterance, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(utterance).__name__}")
        speaker = speakers.get(_field(utterance, "speaker", str, at))
        if speaker is None:
            raise DataError(f"{at}: unknown speaker {utterance['speaker']!r}, expected one of {list(speakers)}")
        text = _field(utterance, "content" if original else "text", str, at)
        strategy = None
        if speaker == SUPPORTER:
            holder = _field(utterance, "annotation", dict, at) if original else utterance
            name = _field(holder, "strategy", str, at)
            if name not in STRATEGY_NAMES:
                raise DataError(f"{at}: unknown strategy {name!r}, expected one of {list(STRATEGY_NAMES)}")
            strategy = STRATEGY_NAMES.index(name)
        turns.append(Turn(speaker, normalise_space(text), strategy))
    return Dialogue(normalise_space(_field(obj, "situation", str, where)), tuple(turns))


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{file}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read: {err}") from None


def read_json_lines(file: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON Lines file; DataError names the line."""
    for lineno, line in enumerate(_read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{lineno}: malformed JSON (column {err.colno}): {err.msg}") from None


def _read_split_file(file: Path) -> list[Dialogue]:
    return [_conversation(obj, f"{file}:{lineno}", original=False) for lineno, obj in read_json_lines(file)]


def _read_original(file: Path) -> list[Dialogue]:
    """The items of ESConv.json in file order, each decoded on its own to know its first line."""
    text = _read_text(file)
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> DataError:
        return DataError(f"{file}:{text.count(chr(10), 0, pos) + 1}: malformed JSON: {what}")

    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise fail(pos, "expected a list of conversations (ESConv.json; give split files by their folder)")
    pos = _SPACE.match(text, pos + 1).end()
    conversations, line, seen = [], 1, 0
    while not text.startswith("]", pos):
        line, seen = line + text.count("\n", seen, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{err.lineno}: malformed JSON (column {err.colno}): {err.msg}") from None
        conversations.append(_conversation(obj, f"{file}:{line}", original=True))
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise fail(pos, "expected ',' or ']'")
    end = _SPACE.match(text, pos + 1).end()
    if end < len(text):
        raise fail(end, "text after the list")
    return conversations


def split_conversations(conversations: list[Dialogue], split: str) -> list[Dialogue]:
    """The prior-work split of ESConv.json's list (in file order): seed 13 shuffle, 15/15/70.

    `random.Random(13).shuffle` gives the same permutation as the original
    `random.seed(13); random.shuffle(data)` (same generator, same seeding) without touching the
    global state; tests/test_data.py checks the result against the split files.
    """
    order = list(conversations)
    random.Random(_SPLIT_SEED).shuffle(order)
    n = int(0.15 * len(order))  # 195 of 1,300
    return {"valid": order[:n], "test": order[n : 2 * n], "train": order[2 * n :]}[split]


def load_conversations(path: str | os.PathLike[str], split: str) -> list[Dialogue]:
    """The conversations of one split ("train", "valid" or "test") from `path` (see module doc)."""
    if split not in SPLITS:
        raise DataError(f"{path}: unknown split {split!r}, expected one of {list(SPLITS)}")
    source = Path(path)
    if source.is_dir():
        return _read_split_file(source / f"{split}.txt")
    if source.is_file():
        return split_conversations(_read_original(source), split)
    if str(path) == HUB_DATASET:
        try:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(HUB_DATASET, f"{split}.txt", repo_type="dataset")
        except Exception as err:  # no network, no package, no access: all end the same way
            raise DataError(f"{HUB_DATASET}: cannot download {split}.txt from the hub: {err}") from None
        return _read_split_file(Path(file))
    raise DataError(
        f"{path}: not found; expected a folder with train.txt/valid.txt/test.txt, "
        f"an ESConv.json file, or {HUB_DATASET!r} (online)"
    )


def build_examples(
    conversations: list[Dialogue],
    tokenizer: Tokenizer,
    *,
    max_source: int = 160,
    max_target: int = 40,
    use_situation: bool = True,
) -> list[Example]:
    """One example per supporter turn after the first utterance (formulas in the module doc).

    `use_situation=False` drops the situation, which gives thu-coai's BlenderBot-Joint inputs.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    examples = []
    for c, conversation in enumerate(conversations):
        context = [tokenizer.encode(conversation.situation)] if use_situation else []
        for t, turn in enumerate(conversation.turns):
            ids = tokenizer.encode(turn.text)
            if turn.strategy is not None:
                strategy_id = tokenizer.strategy_ids[turn.strategy]
                if t > 0:
                    source = [i for utterance in context for i in (*utterance, eos)][:-1]
                    labels = [strategy_id, *ids, eos][: max_target + 1]
                    examples.append(
                        Example(
                            conversation=c,
                            turn=t,
                            input_ids=tuple(source[-max_source:]),
                            decoder_input_ids=(bos, *labels[:-1]),
                            labels=tuple(labels),
                            strategy=turn.strategy,
                            situation=conversation.situation,
                            context=tuple(u.text for u in conversation.turns[:t]),
                            response=turn.text,
                            speakers=tuple(u.speaker for u in conversation.turns[:t]),
                        )
                    )
                ids = [strategy_id, *ids]
            context.append(ids)
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors, all int64.

    input_ids, attention_mask: (B, S); decoder_input_ids, decoder_attention_mask, labels: (B, T),
    labels padded with -100 (ignored by cross-entropy); strategy: (B,) class ids 0..7, absent for
    language-model examples (strategy None).
    """
    if not examples:
        raise ValueError("collate needs at least one example")

    def pad(rows: list[tuple[int, ...]], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        return torch.tensor([[*row, *[value] * (width - len(row))] for row in rows], dtype=torch.long)

    sources = [e.input_ids for e in examples]
    targets = [e.decoder_input_ids for e in examples]
    batch = {
        "input_ids": pad(sources, pad_id),
        "attention_mask": pad([(1,) * len(s) for s in sources], 0),
        "decoder_input_ids": pad(targets, pad_id),
        "decoder_attention_mask": pad([(1,) * len(t) for t in targets], 0),
        "labels": pad([e.labels for e in examples], -100),
    }
    strategies = [e.strategy for e in examples]
    if any(s is None for s in strategies):
        if any(s is not None for s in strategies):
            raise ValueError("a batch mixes examples with and without a strategy")
        return batch  # language-model examples: no strategy target
    return batch | {"strategy": torch.tensor(strategies, dtype=torch.long)}


def dataset_stats(conversations: list[Dialogue]) -> dict[str, object]:
    """Counts: conversations, utterances, seeker/supporter turns, supporter turns per strategy."""
    turns = [turn for conversation in conversations for turn in conversation.turns]
    strategies = [turn.strategy for turn in turns if turn.speaker == SUPPORTER]
    return {
        "conversations": len(conversations),
        "utterances": len(turns),
        "seeker_turns": len(turns) - len(strategies),
        "supporter_turns": len(strategies),
        "strategies": {name: strategies.count(k) for k, name in enumerate(STRATEGY_NAMES)},
    }
