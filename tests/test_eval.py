"""star-eval on a random tiny model and the project-written ESConv fixture: what it writes, that
its scores are the SPEC metrics of what it wrote, that strategies are predicted (never gold)
outside the labelled oracle run, and that bad input is one clear message."""

from __future__ import annotations

from star_runtime.detok import readable

import hashlib
import json
import math
import re
import socket
from pathlib import Path

import pytest
import torch

from esconv_fixture import SEEKER_LINES, SUPPORTER_LINES, write_esconv
from fake_openai import FakeOpenAI, Reply, completion, user_prompt
from star_runtime.strategies import STRATEGIES, STRATEGY_DESCRIPTIONS, STRATEGY_NAMES
from star_runtime.tokenizer import Tokenizer
from star_training import eval_cli, judge_cli
from star_training.checkpoint import load_model, save_model
from star_training.config import StarConfig
from star_training.data import build_examples, collate, load_conversations
from star_training.llm_responder import ShotSampler, parse_reply, train_shots
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
    save_model(model, root / "model", tokenizer_dir=tokenizer_dir)
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
    assert scores["decoding"] == {"do_sample": True, "top_p": 0.3, "top_k": 30, "temperature": 0.7,
                                  "repetition_penalty": 1.03, "max_new_tokens": 40}

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


# -- --responder openai: an LLM writes the replies (SC+), against a fake OpenAI-compatible server ------
def llm_reply(body: dict, n: int) -> Reply:
    """SC+: a reply naming the strategy asked for. Baseline: a tag chosen from the prompt's hash,
    and none for the conversations of odd situation number, so both parsing paths are taken."""
    prompt = user_prompt(body)
    asked = re.search(r"using the strategy (\[[^\]]+\])", prompt)
    if asked:
        return Reply(body=completion(f"Supporter: i hear you , {asked.group(1)[1:-1].lower()} ."))
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    odd = int(re.search(r"Situation: situation number (\d+)", prompt).group(1)) % 2
    tag = "" if odd else f"{STRATEGIES[h % 8]} "
    return Reply(body=completion(f"{tag}that sounds really hard ."))


LABELS = {"seeker": "Help-seeker", "supporter": "Supporter"}


def request_for(pred: dict, requests: list[dict]) -> str:
    """The prompt that asked for `pred`'s reply: the one holding its conversation, speakers named
    (requests arrive in any order: several are in flight at once)."""
    said = "\n".join(f"{LABELS[who]}: {text}" for who, text in zip(pred["speakers"], pred["context"], strict=True))
    block = f"Conversation:\nSituation: {pred['situation']}\n{said}\n\n"
    [prompt] = [user_prompt(b) for b in requests if block in user_prompt(b)]
    return prompt


def run_llm_eval(setup, out: Path | None, server: FakeOpenAI, cache: Path, *extra: str, model: bool = True) -> int:
    model_dir, data = setup
    return eval_cli.main([*([str(model_dir)] if model else []), "--data", str(data), "--limit", str(N),
                          "--batch-size", "4", *(["--out", str(out)] if out else []), "--responder", "openai",
                          "--base-url", server.url, "--model", "gpt-test", "--cache", str(cache), "--backoff", "0",
                          *extra])


def test_sc_plus_scores_the_llms_replies_written_with_stars_strategies(setup, tmp_path) -> None:
    assert run_eval(setup, tmp_path / "star", "--max-new-tokens", "1") == 0
    star = read_jsonl(tmp_path / "star" / "predictions.jsonl")
    with FakeOpenAI(llm_reply) as server:
        assert run_llm_eval(setup, tmp_path / "sc", server, tmp_path / "cache", "--shots", "2") == 0
        assert len(server.requests) == N
        preds = read_jsonl(tmp_path / "sc" / "predictions.jsonl")
        # STAR's strategy, the one star-eval reports, is the one the LLM is told to use
        assert [p["predicted_strategy"] for p in preds] == [p["predicted_strategy"] for p in star]
        for p in preds:
            prompt = request_for(p, server.requests)  # the conversation, speakers named
            name = p["predicted_strategy"][1:-1]
            assert f"using the strategy [{name}]: {STRATEGY_DESCRIPTIONS[STRATEGY_NAMES.index(name)]}" in prompt
            examples = prompt.split("\n\nConversation:\n")[0]
            assert examples.count("\nSupporter: ") == examples.count(f"\nSupporter: {SUPPORTER_LINES[name]}") == 2
            assert p["hypothesis"] == p["hypothesis_readable"] == f"i hear you , {name.lower()} ."
        assert {(b["model"], b["max_tokens"], b["temperature"]) for b in server.requests} == {("gpt-test", 128, 0)}

        # The same metrics as star-eval, of what was written; the same table; no PPL.
        scores = json.loads((tmp_path / "sc" / "scores.json").read_text())
        gold = [STRATEGIES.index(p["gold_strategy"]) for p in preds]
        predicted = [STRATEGIES.index(p["predicted_strategy"]) for p in preds]
        expected = {**strategy_scores(gold, predicted),
                    **generation_scores([p["hypothesis"] for p in preds], [p["reference"] for p in preds])}
        assert scores["predicted"] == pytest.approx(expected) and "teacher_forced" not in scores
        assert scores["responder"]["shots"] == 2 and scores["responder"]["requests_sent"] == N
        table = (tmp_path / "sc" / "scores.md").read_text().splitlines()
        assert table[:4] == (tmp_path / "star" / "scores.md").read_text().splitlines()[:4]  # header and paper rows
        ours = next(line for line in table if line.startswith("| ours: gpt-test SC+, 2-shot, strategy by STAR |"))
        assert ours.split("|")[4].strip() == ""  # PPL
        assert f"{expected['accuracy']:.2f}" == ours.split("|")[2].strip()

        # A rerun asks nothing and writes the same predictions.
        before = (tmp_path / "sc" / "predictions.jsonl").read_text()
        assert run_llm_eval(setup, tmp_path / "sc", server, tmp_path / "cache", "--shots", "2") == 0
        assert len(server.requests) == N and (tmp_path / "sc" / "predictions.jsonl").read_text() == before


def test_the_no_classifier_baseline_takes_the_strategy_the_llm_names(setup, tmp_path) -> None:
    with FakeOpenAI(llm_reply) as server:
        assert run_llm_eval(setup, tmp_path / "llm", server, tmp_path / "cache", "--classifier", "none", "--shots",
                            "3", model=False) == 0
    preds = read_jsonl(tmp_path / "llm" / "predictions.jsonl")
    assert len(preds) == len(server.requests) == N
    for p in preds:
        prompt = request_for(p, server.requests)
        assert all(f"{tag} {text}" in prompt for tag, text in zip(STRATEGIES, STRATEGY_DESCRIPTIONS))
        assert len(re.findall(r"^Supporter: \[", prompt, flags=re.M)) == 3  # 3 labelled examples
        reply = llm_reply({"messages": [{"role": "user", "content": prompt}]}, 0)
        said = reply.body["choices"][0]["message"]["content"]
        tag = re.match(r"(\[[^\]]+\]) ", said)
        assert p["predicted_strategy"] == (tag.group(1) if tag else None)
        assert p["hypothesis"] == "that sounds really hard ."
    assert {p["predicted_strategy"] is None for p in preds} == {True, False}  # both cases are in the slice
    scores = json.loads((tmp_path / "llm" / "scores.json").read_text())
    gold = [STRATEGIES.index(p["gold_strategy"]) for p in preds]
    named = [-1 if p["predicted_strategy"] is None else STRATEGIES.index(p["predicted_strategy"]) for p in preds]
    assert scores["predicted"]["accuracy"] == pytest.approx(strategy_scores(gold, named)["accuracy"])
    assert scores["model"] is None and scores["responder"]["classifier"] == "none"


def test_star_judge_scores_star_evals_predictions(setup, tmp_path) -> None:
    with FakeOpenAI(llm_reply) as server:
        assert run_llm_eval(setup, tmp_path / "sc", server, tmp_path / "cache") == 0
    judged = {"C1": 8, "C2": 10, "C3": 7, "C4": 6}
    with FakeOpenAI(lambda body, n: Reply(body=completion(json.dumps(judged)))) as server:
        assert judge_cli.main([str(tmp_path / "sc" / "predictions.jsonl"), "--base-url", server.url, "--model", "j",
                               "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "judged")]) == 0
    preds = read_jsonl(tmp_path / "sc" / "predictions.jsonl")
    assert len(server.requests) == N
    assert f"Supporter: {preds[0]['hypothesis_readable']}" in user_prompt(server.requests[0])
    report = json.loads((tmp_path / "judged" / "judge.json").read_text())
    assert {c: report["scores"][c]["mean"] for c in judged} == judged
    assert set(report["by_strategy"]) == {p["predicted_strategy"] for p in preds}


@pytest.mark.parametrize("argv, message", [
    (lambda m, d: [m, "--data", d, "--responder", "openai", "--model", "x"], "needs --base-url"),
    (lambda m, d: [m, "--data", d, "--base-url", "http://127.0.0.1:9/v1"], "need --responder openai"),
    (lambda m, d: ["--data", d, "--responder", "openai", "--classifier", "none", "--base-url", "http://h/v1",
                   "--model", "x"], "needs --out"),
    (lambda m, d: [m, "--data", d, "--responder", "openai", "--classifier", "none", "--base-url", "http://h/v1",
                   "--model", "x", "--out", "o"], "uses no STAR model"),
    (lambda m, d: ["--data", d, "--responder", "openai", "--base-url", "http://h/v1", "--model", "x"],
     "needs the STAR model"),
    (lambda m, d: [m, "--data", d, "--responder", "openai", "--base-url", "http://h/v1", "--model", "x",
                   "--shots", "5", "--split", "train"], "draws its examples from the train split"),
    (lambda m, d: [m, "--data", d, "--responder", "openai", "--base-url", "http://h/v1", "--model", "x",
                   "--oracle-strategy"], "--oracle-strategy is for --responder star"),
    (lambda m, d: [m, "--data", d, "--responder", "openai", "--base-url", "h:80", "--model", "x"], "--base-url"),
], ids=["no-url", "url-without-openai", "baseline-without-out", "baseline-with-model", "sc-without-model",
        "shots-from-the-split-scored", "oracle", "bad-url"])
def test_llm_option_mistakes_exit_with_usage(argv, message, setup, capsys) -> None:
    model, data = setup
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(argv(str(model), str(data)))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


def test_an_unreachable_llm_is_one_line_and_exit_1(setup, tmp_path, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    model, data = setup
    assert eval_cli.main([str(model), "--data", str(data), "--limit", "2", "--out", str(tmp_path / "o"),
                          "--responder", "openai", "--base-url", url, "--model", "x", "--cache", str(tmp_path / "c"),
                          "--retries", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("star-eval: error: ") and "cannot connect" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "scores.json").exists()


def test_shots_are_distinct_train_turns_of_the_strategy_drawn_with_the_seed(tmp_path) -> None:
    shots = train_shots(load_conversations(write_esconv(tmp_path / "d", n=12), "train"))
    assert len(shots) == 12 * 3 and all(s.reply == SUPPORTER_LINES[STRATEGY_NAMES[s.strategy]] for s in shots)
    assert all(s.before is not None and s.before[1] in SEEKER_LINES for s in shots)
    draw = ShotSampler(shots, seed=1).draw(3, strategy=2)
    assert len({id(s) for s in draw}) == 3 and {s.strategy for s in draw} == {2}
    assert draw == ShotSampler(shots, seed=1).draw(3, strategy=2)
    assert [ShotSampler(shots, seed=k).draw(5) for k in range(3)] != [ShotSampler(shots, seed=0).draw(5)] * 3
    assert len(ShotSampler(shots, seed=1).draw(100, strategy=2)) == len([s for s in shots if s.strategy == 2])
    assert len(STRATEGY_DESCRIPTIONS) == len(STRATEGY_NAMES)


@pytest.mark.parametrize("answer, chose, expected", [
    ("Supporter: [Question] How are you?", True, (0, "How are you?")),
    ("strategy: [reflection of feelings]  You feel alone.", True, (2, "You feel alone.")),
    ("How are you?", True, (None, "How are you?")),
    ("[Question] How are you?", False, (None, "[Question] How are you?")),
    ("Supporter:  I am here.\n", False, (None, "I am here.")),
])
def test_parse_reply(answer, chose, expected) -> None:
    assert parse_reply(answer, chose) == expected
