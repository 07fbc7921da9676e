"""star-eval on a random tiny model and the project-written ESConv fixture: what it writes, that
its scores are the SPEC metrics of what it wrote, that strategies are predicted (never gold)
outside the labelled oracle run, and that bad input is one clear message."""

from __future__ import annotations

from star_runtime.detok import readable

import json
import math
from pathlib import Path

import pytest
import torch

from esconv_fixture import write_esconv
from star_runtime.strategies import STRATEGIES
from star_runtime.tokenizer import Tokenizer
from star_training import eval_cli
from star_training.checkpoint import load_model
from star_training.config import StarConfig
from star_training.data import build_examples, collate, load_conversations
from star_training.metrics import generation_scores, strategy_scores

N = 4  # examples scored: one batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """A random tiny STAR model folder (with its tokenizer) and a fixture data folder."""
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer.from_dir(tokenizer_dir)
    torch.manual_seed(0)
    model = load_model(preset="tiny", star_config=StarConfig(strategy_token_ids=tok.strategy_ids),
                       vocab_size=tok.vocab_size)
    model.save_pretrained(root / "model", tokenizer_dir=tokenizer_dir)
    return root / "model", write_esconv(root / "data")


def run_eval(setup, out: Path, *extra: str) -> int:
    model, data = setup
    return eval_cli.main([str(model), "--data", str(data), "--out", str(out), "--limit", str(N),
                          "--batch-size", "4", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_predictions_scores_and_table_from_predicted_strategies(setup, tmp_path, capsys) -> None:
    assert run_eval(setup, tmp_path, "--oracle-strategy") == 0
    preds = read_jsonl(tmp_path / "predictions.jsonl")
    assert all(p["hypothesis_readable"] == readable(p["hypothesis"]) for p in preds)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(preds) == N and scores["examples"] == N and scores["split"] == "test"
    assert set(preds[0]) >= {"context", "gold_strategy", "predicted_strategy", "reference", "hypothesis"}
    assert scores["decoding"] == {"top_p": 0.3, "top_k": 30, "temperature": 0.7, "repetition_penalty": 1.03,
                                  "max_new_tokens": 40}

    # The scores are the SPEC metrics of the written predictions.
    gold = [STRATEGIES.index(p["gold_strategy"]) for p in preds]
    predicted = [STRATEGIES.index(p["predicted_strategy"]) for p in preds]
    expected = {**strategy_scores(gold, predicted),
                **generation_scores([p["hypothesis"] for p in preds], [p["reference"] for p in preds])}
    assert scores["predicted"] == pytest.approx(expected)
    tf = scores["teacher_forced"]
    assert tf["ppl"] == pytest.approx(math.exp(tf["nll_sum"] / tf["tokens"]))

    # The oracle run feeds the gold strategy, is kept apart, and is labelled in the table.
    oracle = read_jsonl(tmp_path / "predictions_oracle.jsonl")
    assert [p["predicted_strategy"] for p in oracle] == [p["gold_strategy"] for p in oracle]
    assert scores["oracle"] == pytest.approx(generation_scores([p["hypothesis"] for p in oracle],
                                                               [p["reference"] for p in oracle]))
    table = (tmp_path / "scores.md").read_text()
    assert "| paper: BlenderBot-Joint + STAR |  | 24.81 | 15.96 |" in table
    assert "ORACLE strategy" in table and "PREDICTED strategy" in table
    assert table.splitlines()[0] in capsys.readouterr().out


def test_predicted_strategy_is_the_models_argmax_not_the_gold(setup, tmp_path) -> None:
    model_dir, data = setup
    assert run_eval(setup, tmp_path, "--max-new-tokens", "1") == 0
    preds = read_jsonl(tmp_path / "predictions.jsonl")
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir).eval()
    examples = build_examples(load_conversations(data, "test"), tok)[:N]
    batch = collate(examples, tok.pad_id)
    with torch.no_grad():
        argmax = model(**batch).strategy_logits.argmax(-1).tolist()
    assert [p["predicted_strategy"] for p in preds] == [STRATEGIES[k] for k in argmax]
    # A random model disagrees with the gold strategy somewhere, so the check above can fail.
    assert argmax != [e.strategy for e in examples]


def test_a_fixed_seed_gives_the_same_replies(setup, tmp_path) -> None:
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert run_eval(setup, tmp_path / name, "--seed", seed, "--max-new-tokens", "8") == 0
    a, b, c = ((tmp_path / x / "predictions.jsonl").read_text() for x in "abc")
    assert a == b and a != c


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda m, d, t: [str(t / "nothing"), "--data", str(d)], "no such folder"),
        (lambda m, d, t: [str(t), "--data", str(d)], "nor a star-train run folder"),
        (lambda m, d, t: [str(m), "--data", str(t / "nowhere")], "does not exist"),
    ],
    ids=["missing-model", "not-a-checkpoint", "missing-data"],
)
def test_bad_input_is_one_clear_message(argv, message, setup, tmp_path, capsys) -> None:
    model, data = setup
    assert eval_cli.main(argv(model, data, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("star-eval: error: ") and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--top-p", "2"), ("--temperature", "0")])
def test_out_of_range_options_exit_with_usage(flag, value, setup, capsys) -> None:
    model, data = setup
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([str(model), "--data", str(data), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
