"""star_training.data on the real ESConv files, plus small bad-input fixtures written here.

Expected counts are those of ../shared/data/esconv/README.md (verified there against the
thu-coai README table).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from star_runtime.strategies import STRATEGIES, STRATEGY_NAMES
from star_runtime.tokenizer import Tokenizer
from star_training.data import (
    SPLITS,
    SUPPORTER,
    Dialogue,
    DataError,
    build_examples,
    collate,
    dataset_stats,
    load_conversations,
    split_conversations,
)

# README per-split supporter turns, in STRATEGY_NAMES order (Q, RP, RF, SD, AR, PS, Inf, Oth).
EXPECTED = {
    "train": (910, 26648, 13889, 12759, (2622, 798, 990, 1185, 1988, 1987, 835, 2354)),
    "valid": (195, 5678, 2956, 2722, (549, 138, 211, 264, 402, 459, 194, 505)),
    "test": (195, 6039, 3144, 2895, (630, 153, 235, 264, 437, 508, 186, 482)),
}


@pytest.fixture(scope="module")
def splits(esconv_dir: Path) -> dict[str, list[Dialogue]]:
    return {split: load_conversations(esconv_dir, split) for split in SPLITS}


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def valid_lines(esconv_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (esconv_dir / "valid.txt").read_text(encoding="utf-8").splitlines()]


def test_counts(splits: dict[str, list[Dialogue]]) -> None:
    for split, (conversations, utterances, seeker, supporter, strategies) in EXPECTED.items():
        stats = dataset_stats(splits[split])
        assert stats == {
            "conversations": conversations,
            "utterances": utterances,
            "seeker_turns": seeker,
            "supporter_turns": supporter,
            "strategies": dict(zip(STRATEGY_NAMES, strategies)),
        }
    total = dataset_stats([c for split in SPLITS for c in splits[split]])
    assert (total["conversations"], total["utterances"], total["supporter_turns"]) == (1300, 38365, 18376)
    assert list(total["strategies"].values()) == [3801, 1089, 1436, 1713, 2827, 2954, 1215, 3341]


def test_split_from_original_layout(esconv_dir: Path, splits: dict[str, list[Dialogue]]) -> None:
    original = esconv_dir / "ESConv.reconstructed.json"
    if not original.is_file():
        pytest.skip(f"{original} not found")
    for split in SPLITS:
        assert load_conversations(original, split) == splits[split], split


def test_split_rule_is_the_global_seed_13_shuffle() -> None:
    order = list(range(1300))
    random.seed(13)
    random.shuffle(order)
    assert split_conversations(list(range(1300)), "valid") == order[:195]
    assert split_conversations(list(range(1300)), "test") == order[195:390]
    assert split_conversations(list(range(1300)), "train") == order[390:]


def test_no_conversation_in_two_splits(splits: dict[str, list[Dialogue]]) -> None:
    keys = {split: {(c.situation, tuple(t.text for t in c.turns)) for c in splits[split]} for split in SPLITS}
    assert not keys["train"] & keys["valid"] and not keys["train"] & keys["test"]
    assert not keys["valid"] & keys["test"]


def test_examples(splits: dict[str, list[Dialogue]], tok: Tokenizer) -> None:
    for split in SPLITS:
        examples = build_examples(splits[split], tok)
        responses = [(c, t) for c, conv in enumerate(splits[split]) for t, turn in enumerate(conv.turns)
                     if turn.speaker == SUPPORTER and t > 0]
        assert [(e.conversation, e.turn) for e in examples] == responses
        assert max(len(e.input_ids) for e in examples) == 160
        assert max(len(e.labels) for e in examples) == 41
        for e in examples:
            assert len(e.input_ids) <= 160 and len(e.labels) <= 41
            assert e.decoder_input_ids == (tok.bos_id, *e.labels[:-1])
            assert e.labels[0] == tok.strategy_ids[e.strategy]
            assert len(e.labels) == 41 or e.labels[-1] == tok.eos_id
            turns = splits[split][e.conversation].turns
            assert e.response == turns[e.turn].text and e.context == tuple(t.text for t in turns[: e.turn])


def thu_coai_process(tok: Tokenizer):
    """thu-coai's `process`: the reference tokenizer, which maps a strategy tag in the text to its
    token. Ours encodes typed tags as ordinary text, so the tag goes through token_to_id."""
    return lambda text: [tok.token_to_id(text)] if text in STRATEGIES else tok.encode(text)


def thu_coai_features(dialog: list[dict], process, bos: int, eos: int, max_input: int) -> list[tuple]:
    """Transcription of codes_zcj/inputters/strat.py: convert_data_to_inputs + featurize."""
    inputs, context = [], []
    for i in range(len(dialog)):
        text = process(" ".join(dialog[i]["text"].strip().split()))
        if dialog[i]["speaker"] == "sys":
            strat_id = process("[" + dialog[i]["strategy"] + "]")
            assert len(strat_id) == 1
            strat_id = strat_id[0]
        if i > 0 and dialog[i]["speaker"] == "sys":
            inputs.append((context.copy(), text, strat_id))
        if dialog[i]["speaker"] == "sys":
            text = [strat_id] + text
        context = context + [text]
    features = []
    for ctx, response, strat_id in inputs:
        input_ids = sum([c + [eos] for c in ctx], [])[:-1][-max_input:]
        labels = ([strat_id] + response + [eos])[: 40 + 1]
        features.append((input_ids, [bos] + labels[:-1], labels))
    return features


def test_matches_thu_coai_inputter(valid_lines: list[dict], splits, tok: Tokenizer) -> None:
    conversations = splits["valid"]
    plain = build_examples(conversations, tok, use_situation=False)
    with_situation = build_examples(conversations, tok)
    expected, full = [], []
    for raw in valid_lines:
        expected += thu_coai_features(raw["dialog"], thu_coai_process(tok), tok.bos_id, tok.eos_id, 160)
        situation = tok.encode(" ".join(raw["situation"].split())) + [tok.eos_id]
        full += [(situation + f[0], *f[1:])
                 for f in thu_coai_features(raw["dialog"], thu_coai_process(tok), tok.bos_id, tok.eos_id, 10**9)]
    assert len(plain) == len(with_situation) == len(expected) == 2722 - sum(
        c.turns[0].speaker == SUPPORTER for c in conversations
    )
    for e, feature in zip(plain, expected):
        assert (list(e.input_ids), list(e.decoder_input_ids), list(e.labels)) == feature
    for e, (input_ids, _, labels) in zip(with_situation, full):
        assert list(e.input_ids) == input_ids[-160:] and list(e.labels) == labels
    assert sum(a.input_ids != b.input_ids for a, b in zip(plain, with_situation)) > 0


def test_limits_are_parameters(splits, tok: Tokenizer) -> None:
    examples = build_examples(splits["valid"][:20], tok, max_source=32, max_target=5)
    assert max(len(e.input_ids) for e in examples) == 32 and max(len(e.labels) for e in examples) == 6


def test_collate(splits, tok: Tokenizer) -> None:
    examples = build_examples(splits["test"][:3], tok)[:5]
    batch = collate(examples, tok.pad_id)
    width, depth = max(len(e.input_ids) for e in examples), max(len(e.labels) for e in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, width)
    for name in ("labels", "decoder_input_ids", "decoder_attention_mask"):
        assert batch[name].shape == (5, depth)
    assert all(t.dtype == torch.long for t in batch.values())
    for row, e in enumerate(examples):
        n, m = len(e.input_ids), len(e.labels)
        assert batch["input_ids"][row, :n].tolist() == list(e.input_ids)
        assert (batch["input_ids"][row, n:] == tok.pad_id).all() and batch["attention_mask"][row].sum() == n
        assert batch["labels"][row, :m].tolist() == list(e.labels) and (batch["labels"][row, m:] == -100).all()
        assert batch["decoder_input_ids"][row, :m].tolist() == list(e.decoder_input_ids)
        assert (batch["decoder_input_ids"][row, m:] == tok.pad_id).all()
        assert batch["decoder_attention_mask"][row].sum() == m
    assert batch["strategy"].tolist() == [e.strategy for e in examples]
    with pytest.raises(ValueError):
        collate([], tok.pad_id)


# ---------------------------------------------------------------- bad input
GOOD = {"situation": "s", "dialog": [{"text": "hi", "speaker": "usr"},
                                     {"text": "hello", "speaker": "sys", "strategy": "Question"}]}


def line(**change) -> str:
    conversation = json.loads(json.dumps(GOOD))
    for key, value in change.items():
        if key.startswith("turn1_"):
            conversation["dialog"][1][key[6:]] = value
        elif value is None:
            del conversation[key]
        else:
            conversation[key] = value
    return json.dumps(conversation)


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        ('{"situation": "s", "dialog": [', r"train\.txt:3: malformed JSON"),
        (line(situation=None), r"train\.txt:3: missing field 'situation'"),
        (line(dialog=None), r"train\.txt:3: missing field 'dialog'"),
        (line(dialog="hi"), r"train\.txt:3: field 'dialog' should be a list"),
        (line(turn1_strategy="Hugging"), r"train\.txt:3: dialog\[1\]: unknown strategy 'Hugging'"),
        (line(turn1_speaker="bot"), r"train\.txt:3: dialog\[1\]: unknown speaker 'bot'"),
        (line(turn1_text=7), r"train\.txt:3: dialog\[1\]: field 'text' should be a str"),
        ("[1, 2]", r"train\.txt:3: expected a JSON object"),
    ],
)
def test_bad_split_file(tmp_path: Path, third_line: str, message: str) -> None:
    (tmp_path / "train.txt").write_text("\n".join([line(), line(), third_line, line()]) + "\n")
    with pytest.raises(DataError, match=message):
        load_conversations(tmp_path, "train")


def test_good_fixture_loads(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(line() + "\n\n" + line() + "\n")
    conversations = load_conversations(tmp_path, "train")
    assert len(conversations) == 2 and conversations[0].turns[1].strategy == 0
    assert issubclass(DataError, ValueError)


def original(conversations: list[dict]) -> str:
    return json.dumps(conversations, indent=2)


ORIGINAL = {"situation": "s", "dialog": [
    {"speaker": "seeker", "annotation": {}, "content": "hi \n"},
    {"speaker": "supporter", "annotation": {"strategy": "Others"}, "content": " hello  there"}]}


def test_original_layout(tmp_path: Path) -> None:
    file = tmp_path / "ESConv.json"
    file.write_text(original([ORIGINAL] * 3))
    conversations = load_conversations(file, "train")  # int(0.15 * 3) = 0: all three are train
    assert len(conversations) == 3 and load_conversations(file, "valid") == []
    assert [(t.speaker, t.text, t.strategy) for t in conversations[0].turns] == [
        ("seeker", "hi", None), ("supporter", "hello there", 7)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"situation": "s", "dialog": [{"speaker": "seeker", "annotation": {}}]},
         r"ESConv\.json:(\d+): dialog\[0\]: missing field 'content'"),
        ({"situation": "s", "dialog": [{"speaker": "supporter", "annotation": {}, "content": "x"}]},
         r"ESConv\.json:(\d+): dialog\[0\]: missing field 'strategy'"),
        ({"situation": "s", "dialog": [{"speaker": "usr", "content": "x"}]},
         r"ESConv\.json:(\d+): dialog\[0\]: unknown speaker 'usr'"),
    ],
)
def test_bad_original(tmp_path: Path, bad: dict, message: str) -> None:
    file = tmp_path / "ESConv.json"
    text = original([ORIGINAL, bad])
    file.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        load_conversations(file, "test")
    # The line named is where the bad conversation starts.
    lineno = int(re.search(message, str(info.value)).group(1))
    assert text.split("\n")[lineno - 1] == "  {" and text.split("\n")[lineno - 2] == "  },"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[\n{"situation": "s",\n "dialog": [}]', r"ESConv\.json:3: malformed JSON"),
        ('[\n{"situation": "s", "dialog": []}\n{"situation": "s", "dialog": []}]',
         r"ESConv\.json:3: malformed JSON: expected ',' or ']'"),
        ('{"situation": "s"}', r"ESConv\.json:1: malformed JSON: expected a list"),
        ('[]\n]', r"ESConv\.json:2: malformed JSON: text after the list"),
    ],
)
def test_malformed_original(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "ESConv.json"
    file.write_text(text)
    with pytest.raises(DataError, match=message):
        load_conversations(file, "train")


def test_bad_path_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: not found; expected a folder"):
        load_conversations(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"valid\.txt: file not found"):
        load_conversations(tmp_path, "valid")
    with pytest.raises(DataError, match=rf"{tmp_path.name}: unknown split 'dev'"):
        load_conversations(tmp_path, "dev")
