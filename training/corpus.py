"""Dialogue corpora for stage 0 (dialogue pretraining), read as data.Dialogue (turns without strategies).

Sources, each named by one `star-train --stage 0 --corpus SOURCE` (repeatable):
  chitchat       the `chitchat-dataset` package (MIT license; BYU PCC lab's Chit-Chat Challenge):
                 7,168 conversations of two people; a sender's consecutive messages are one turn.
  esconv-train   every utterance of ESConv's *train* split (from --data), seeker and supporter,
                 the situation as the first context item, as stage 1 reads it. Valid and test are
                 never targets: they stay unseen.
  PATH           a JSON Lines file of a deployment's own transcripts, one conversation per line:
                 {"turns": [["speaker", "text"], ...]}.

Examples, one per turn i >= 1 of each conversation (turns t_0 .. t_{n-1}, token ids):

    input_ids      = (c_0 + [eos] + t_0 + [eos] + ... + t_{i-1})[-max_source:]   c_0: situation if any
    labels         = [-100] + (t_i + [eos])[:max_target]
    decoder_inputs = [bos, bos] + labels[1:-1]

Position 1 reads a second `__start__` where fine-tuning puts the strategy token; its label (-100)
is not scored, exactly like the strategy token's in stage 1, so the language-model loss is over
the same positions (the response and `__end__`) and there is no strategy target.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from star_runtime.tokenizer import Tokenizer
from star_training.data import DataError, Dialogue, Example, Turn, load_conversations, normalise_space, read_json_lines
from star_training.model import IGNORE_INDEX

CHITCHAT, ESCONV_TRAIN = "chitchat", "esconv-train"
NAMED = (CHITCHAT, ESCONV_TRAIN)


def _dialogue(turns: list[tuple[str, str]]) -> Dialogue:
    """A dialogue without situation or strategies from (speaker, text) messages: a speaker's
    consecutive messages join into one turn (chat apps split a turn into messages), whitespace
    normalised, empty ones dropped."""
    merged: list[tuple[str, str]] = []
    for speaker, text in turns:
        text = normalise_space(text)
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, f"{merged[-1][1]} {text}")
        else:
            merged.append((speaker, text))
    return Dialogue("", tuple(Turn(speaker, text, None) for speaker, text in merged))


def _chitchat_file() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise DataError("--corpus chitchat needs the chitchat-dataset package: pip install chitchat-dataset "
                        "(or the train extra: pip install '.[train]')")
    return Path(spec.origin).parent / "dataset.json"


def read_chitchat(file: Path | None = None) -> list[Dialogue]:
    """The Chit-Chat Challenge conversations (dataset.json: {id: {"messages": [[{text, sender}..]..]}})."""
    file = file or _chitchat_file()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: cannot read the chitchat dataset: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a JSON object of conversations")
    dialogues = []
    for key, conversation in data.items():
        try:
            turns = [(str(u["sender"]), str(u["text"])) for message in conversation["messages"] for u in message]
        except (KeyError, TypeError):
            raise DataError(f"{file}: conversation {key!r}: expected messages of {{'sender', 'text'}}") from None
        dialogues.append(_dialogue(turns))
    return dialogues


def read_esconv(data: str | os.PathLike[str], split: str = "train", use_situation: bool = True) -> list[Dialogue]:
    """One ESConv split as plain dialogues: every utterance, the situation first (if used)."""
    return [Dialogue(c.situation if use_situation else "", tuple(t for t in c.turns if t.text))
            for c in load_conversations(data, split)]


def read_turns_jsonl(file: Path) -> list[Dialogue]:
    """A deployment's transcripts: one {"turns": [[speaker, text], ...]} per line."""
    dialogues = []
    for lineno, obj in read_json_lines(file):
        turns = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(turns, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns
        ):
            raise DataError(f"{file}:{lineno}: expected {{\"turns\": [[speaker, text], ...]}}")
        dialogues.append(_dialogue([(s, t) for s, t in turns]))
    return dialogues


def read_corpus(source: str, data: str | os.PathLike[str]) -> list[Dialogue]:
    """The dialogues of one --corpus SOURCE (see the module doc); `data` is ESConv's --data."""
    if source == CHITCHAT:
        return read_chitchat()
    if source == ESCONV_TRAIN:
        return read_esconv(data)
    path = Path(source)
    if path.is_file():
        return read_turns_jsonl(path)
    raise DataError(f"--corpus {source}: not found; expected {' or '.join(NAMED)} or a JSON Lines file of "
                    "{\"turns\": [[speaker, text], ...]}")


def build_lm_examples(
    dialogues: list[Dialogue], tokenizer: Tokenizer, *, max_source: int = 160, max_target: int = 40
) -> list[Example]:
    """One language-model example per turn after the first (formulas in the module doc)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    examples = []
    for c, dialogue in enumerate(dialogues):
        context = [tokenizer.encode(dialogue.situation)] if dialogue.situation else []
        texts = [turn.text for turn in dialogue.turns]
        for t, text in enumerate(texts):
            ids = tokenizer.encode(text)
            if t > 0 and ids:
                source = [i for utterance in context for i in (*utterance, eos)][:-1]
                labels = (IGNORE_INDEX, *[*ids, eos][:max_target])
                examples.append(Example(
                    conversation=c, turn=t, input_ids=tuple(source[-max_source:]),
                    decoder_input_ids=(bos, bos, *labels[1:-1]), labels=labels, strategy=None,
                    situation=dialogue.situation, context=tuple(texts[:t]), response=text,
                ))
            context.append(ids)
    return examples


def corpus_stats(examples: list[Example]) -> dict[str, int]:
    """Examples, target tokens (scored: response + eos) and source tokens of one epoch."""
    return {
        "examples": len(examples),
        "target_tokens": sum(len(e.labels) - 1 for e in examples),
        "source_tokens": sum(len(e.input_ids) for e in examples),
    }
