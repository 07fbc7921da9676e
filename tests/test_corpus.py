"""Stage 0, dialogue pretraining: the corpus readers, the language-model examples, length
buckets, time-based checkpoints, and star-train --stage 0 end to end on tiny corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from esconv_fixture import write_esconv
from star_runtime.tokenizer import Tokenizer
from star_training import train_cli
from star_training.corpus import (
    build_lm_examples,
    corpus_stats,
    read_chitchat,
    read_corpus,
    read_esconv,
    read_turns_jsonl,
)
from star_training.data import DataError, Dialogue, Turn, build_examples, collate, load_conversations
from star_training.model import IGNORE_INDEX
from star_training.progress import read_jsonl
from star_training.trainer import Trainer, epoch_steps


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_esconv(tmp_path_factory.mktemp("esconv"))


CHATS = [
    [["ann", "hi there"], ["ann", "how was your day?"], ["bob", "long, I moved house"],
     ["ann", "oh wow, where to?"], ["bob", "closer to my sister"], ["bob", ""], ["ann", "that sounds nice"]],
    [["a", "do you like to cook?"], ["b", "I do, mostly soup"], ["a", "what kind?"], ["b", "lentil, every week"]],
]


@pytest.fixture
def transcripts(tmp_path) -> Path:
    file = tmp_path / "transcripts.jsonl"
    file.write_text("".join(json.dumps({"turns": turns}) + "\n" for turns in CHATS * 6))
    return file


def dialogue(*turns: tuple[str, str], situation: str = "") -> Dialogue:
    return Dialogue(situation, tuple(Turn(speaker, text, None) for speaker, text in turns))


def pairs(d: Dialogue) -> tuple[tuple[str, str], ...]:
    return tuple((t.speaker, t.text) for t in d.turns)


# -- readers ---------------------------------------------------------------------------------------
def test_transcripts_join_a_speakers_consecutive_messages_and_drop_empty_ones(transcripts) -> None:
    first = read_turns_jsonl(transcripts)[0]
    assert pairs(first) == (("ann", "hi there how was your day?"), ("bob", "long, I moved house"),
                           ("ann", "oh wow, where to?"), ("bob", "closer to my sister"), ("ann", "that sounds nice"))
    assert first.situation == ""


@pytest.mark.parametrize("line, where", [("{not json", "malformed JSON"), ('{"turns": [["a"]]}', "expected"),
                                         ('[["a", "b"]]', "expected"), ('{"turns": [["a", 3]]}', "expected")])
def test_a_bad_transcript_line_is_named(tmp_path, line, where) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text(json.dumps({"turns": CHATS[0]}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: {where}"):
        read_turns_jsonl(file)


def test_chitchat_file_format_groups_messages_by_sender(tmp_path) -> None:
    def msg(sender: str, *texts: str) -> list[dict]:
        return [{"text": t, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"} for t in texts]

    file = tmp_path / "dataset.json"
    file.write_text(json.dumps({"c1": {"messages": [msg("x", "Hello", "How are you?"), msg("y", "fine"),
                                                    msg("y", "and you?"), msg("x", "good")]}}))
    assert read_chitchat(file) == [dialogue(("x", "Hello How are you?"), ("y", "fine and you?"), ("x", "good"))]
    file.write_text(json.dumps({"c1": {"messages": [[{"body": "no text field"}]]}}))
    with pytest.raises(DataError, match="conversation 'c1'"):
        read_chitchat(file)


def test_the_chitchat_package_is_the_corpus_it_says() -> None:
    pytest.importorskip("chitchat_dataset")
    dialogues = read_corpus("chitchat", "unused")
    assert len(dialogues) == 7168
    turns = sum(len(d.turns) for d in dialogues)
    words = sum(len(t.text.split()) for d in dialogues for t in d.turns)
    # the package's own count is 138,737 turns and 2.48M words; empty messages are dropped here
    assert 138_000 < turns <= 138_737 and 2_400_000 < words < 2_550_000
    assert all(a.speaker != b.speaker and a.strategy is None for d in dialogues for a, b in zip(d.turns, d.turns[1:]))


def test_esconv_train_gives_every_utterance_of_train_and_nothing_of_valid_or_test(data_dir) -> None:
    dialogues = read_corpus("esconv-train", data_dir)
    train = load_conversations(data_dir, "train")
    assert [d.turns for d in dialogues] == [c.turns for c in train]
    assert [d.situation for d in dialogues] == [c.situation for c in train]
    seen = {d.situation for d in dialogues}
    for split in ("valid", "test"):
        assert not seen & {c.situation for c in load_conversations(data_dir, split)}
    assert all(d.situation == "" for d in read_esconv(data_dir, "valid", use_situation=False))


def test_an_unknown_corpus_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="--corpus nowhere.jsonl: not found; expected chitchat or esconv-train"):
        read_corpus("nowhere.jsonl", tmp_path)


# -- examples ----------------------------------------------------------------------------------------
def test_language_model_examples_follow_the_formulas(tok) -> None:
    moving = dialogue(("a", "i moved house"), ("b", "where to ?"), ("a", "closer to my sister"), situation="moving")
    examples = build_lm_examples([moving], tok, max_source=6, max_target=3)
    assert [(e.turn, e.response) for e in examples] == [(1, "where to ?"), (2, "closer to my sister")]
    bos, eos = tok.bos_id, tok.eos_id
    for e in examples:
        context = [tok.encode("moving"), *(tok.encode(text) for text in e.context)]
        source = [i for ids in context for i in (*ids, eos)][:-1]
        assert e.input_ids == tuple(source[-6:])
        target = [*tok.encode(e.response), eos][:3]
        assert e.labels == (IGNORE_INDEX, *target)
        assert e.decoder_input_ids == (bos, bos, *target[:-1])
        assert e.strategy is None and len(e.labels) == len(e.decoder_input_ids)
    stats = corpus_stats(examples)
    assert stats == {"examples": 2, "target_tokens": sum(len(e.labels) - 1 for e in examples),
                     "source_tokens": sum(len(e.input_ids) for e in examples)}


def test_language_model_batches_have_no_strategy_and_cannot_mix_with_strategy_ones(tok, data_dir, transcripts) -> None:
    lm = build_lm_examples(read_turns_jsonl(transcripts), tok)
    batch = collate(lm[:4], tok.pad_id)
    assert "strategy" not in batch and (batch["labels"][:, 0] == IGNORE_INDEX).all()
    strat = build_examples(load_conversations(data_dir, "train"), tok)
    with pytest.raises(ValueError, match="mixes"):
        collate([lm[0], strat[0]], tok.pad_id)


def test_length_buckets_keep_the_epochs_examples_and_cut_less_padding(tok, transcripts, data_dir) -> None:
    examples = build_lm_examples(read_turns_jsonl(transcripts) + read_esconv(data_dir), tok)
    lengths = [len(e.input_ids) + len(e.labels) for e in examples]
    sampler = DistributedSampler(examples, num_replicas=1, rank=0, shuffle=True, seed=5)
    plain, bucketed = (epoch_steps(sampler, 1, 4, 1, ls) for ls in (None, lengths))
    flat = lambda steps: [i for step in steps for micro in step for i in micro]  # noqa: E731
    assert sorted(flat(bucketed)) == sorted(flat(plain)) == list(range(len(examples)))
    assert epoch_steps(sampler, 1, 4, 1, lengths) == bucketed  # a pure function of (seed, epoch)
    assert epoch_steps(sampler, 2, 4, 1, lengths) != bucketed

    def padding(steps) -> int:
        return sum(len(m) * max(lengths[i] for i in m) - sum(lengths[i] for i in m) for s in steps for m in s)

    assert padding(bucketed) < padding(plain)


# -- star-train --stage 0 ------------------------------------------------------------------------------
def stage0(data: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["--stage", "0", "--preset", "tiny", "--data", str(data), "--tokenizer", str(tokenizer),
            "--out", str(out), "--batch-size", "4", "--global-batch", "8", "--warmup-steps", "0", "--seed", "3",
            "--lr", "1e-2", *extra]


def test_stage_0_pretrains_on_the_corpora_and_stage_1_starts_from_it(data_dir, tokenizer_dir, transcripts,
                                                                      tmp_path, capsys) -> None:
    out = tmp_path / "pretrain"
    argv = stage0(data_dir, out, tokenizer_dir, "--corpus", str(transcripts), "--corpus", "esconv-train",
                  "--epochs", "3", "--length-buckets")
    assert train_cli.main(argv) == 0
    assert "STAR bypassed" in capsys.readouterr().out
    log = read_jsonl(out / "log.jsonl")
    start = next(r for r in log if r["kind"] == "start")
    assert start["config"]["corpora"] == [str(transcripts.resolve()), "esconv-train"]
    train = [r for r in log if r["kind"] == "train"]
    assert all(r["lambda"] == 0 and r["loss_st"] == 0 for r in train)
    assert train[-1]["loss_lm"] < train[0]["loss_lm"]
    valid = [r for r in log if r["kind"] == "valid"]
    assert len(valid) == 3 and "loss_st" not in valid[0] and valid[-1]["loss_lm"] < valid[0]["loss_lm"]
    assert (out / "best" / "model.safetensors").is_file()

    joint = tmp_path / "joint"
    assert train_cli.main(["--stage", "1", "--init", str(out / "best"), "--data", str(data_dir), "--out", str(joint),
                           "--batch-size", "4", "--global-batch", "8", "--epochs", "1"]) == 0
    assert "loss_st" in next(r for r in read_jsonl(joint / "log.jsonl") if r["kind"] == "valid")


def test_stage_0_saves_every_few_minutes_within_an_epoch(data_dir, tokenizer_dir, tmp_path, monkeypatch) -> None:
    saves: list[int] = []
    original = Trainer.save_last

    def counted(self: Trainer) -> None:
        saves.append(self.position.global_step)
        original(self)

    monkeypatch.setattr(Trainer, "save_last", counted)
    out = tmp_path / "p"
    # 18 + 1 train utterance targets per conversation x 6 -> 30 examples, 4 steps of 8
    assert train_cli.main(stage0(data_dir, out, tokenizer_dir, "--corpus", "esconv-train", "--epochs", "1",
                                 "--save-every", "1e-9")) == 0
    steps = [r["step"] for r in read_jsonl(out / "log.jsonl") if r["kind"] == "train"]
    assert saves == [*steps[:-1], steps[-1]]  # after every step inside the epoch, then at its end
    monkeypatch.undo()
    assert train_cli.main(["--resume", "--out", str(out), "--save-every", "5"]) == 0  # may change on resume


@pytest.mark.parametrize("argv, message", [
    (["--stage", "1", "--corpus", "chitchat"], "--corpus names stage 0's pretraining conversations"),
    (["--stage", "0", "--corpus", "missing.jsonl"], "--corpus missing.jsonl: not found"),
])
def test_bad_stage_0_input_is_one_clear_line(argv, message, data_dir, tokenizer_dir, tmp_path, capsys) -> None:
    rc = train_cli.main([*argv, "--preset", "tiny", "--data", str(data_dir), "--tokenizer", str(tokenizer_dir),
                         "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bf16_autocast_trains_on_the_cpu(data_dir, tokenizer_dir, tmp_path) -> None:
    out = tmp_path / "bf16"
    assert train_cli.main(stage0(data_dir, out, tokenizer_dir, "--corpus", "esconv-train", "--epochs", "1",
                                 "--precision", "bf16", "--max-steps", "2")) == 0
    train = [r for r in read_jsonl(out / "log.jsonl") if r["kind"] == "train"]
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["loss_lm"])) for r in train)
