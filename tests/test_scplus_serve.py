"""star-eval's SC+ mode with star-serve as the responder, both real: a star-serve process on
loopback serves a tiny bundle, and star-eval --responder openai asks it for every reply of a
slice of the fixture's test split (STAR's checkpoint picks the strategy, the server writes).

The server logs each request with --log-messages, so every reply star-eval writes can be traced
to the request that asked for it. The bundle is exported from the same random tiny checkpoint
that star-eval classifies with (tests/star_bundles.py); its replies are random words, which is
all a test of the wiring needs.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("uvicorn")  # star-serve's extra; without it the server cannot start
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from esconv_fixture import write_esconv  # noqa: E402
from serve_process import START_S, Server  # noqa: E402
from star_bundles import tiny_checkpoint  # noqa: E402

from star_training import eval_cli  # noqa: E402
from star_training.llm_responder import SYSTEM  # noqa: E402

N = 4  # examples scored: one batch of STAR's classifier, four requests to the server
MAX_TOKENS = "8"  # the tiny model's replies are random words: a few keep decoding quick
MODEL_NAME = "star-tiny"
LOGGED = re.compile(r"POST /v1/chat/completions (\d+) .*? (\{.*\})$")
PROBE = "probe "  # the start of the messages `served` sends itself, left out of what it returns


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, bundle) -> tuple[Path, Path]:
    """The checkpoint `bundle` was exported from, and a fixture ESConv folder."""
    return tiny_checkpoint(tmp_path_factory, tokenizer_dir), write_esconv(tmp_path_factory.mktemp("scplus") / "data")


@pytest.fixture(scope="module")
def server(bundle):
    srv = Server("--model", str(bundle), "--model-name", MODEL_NAME, "--log-messages")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def served(server: Server) -> list[dict]:
    """Every chat completion the server has logged, as its --log-messages record plus "status".

    A probe request is answered and its log line awaited first: the log is read by a thread, and
    a line still on its way would make a count too low."""
    probe = f"{PROBE}{uuid.uuid4().hex}"
    answer = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "user", "content": probe}], "max_tokens": 1})
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + START_S
    while probe not in server.log:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
    records = []
    for line in list(server.lines):
        if match := LOGGED.search(line.rstrip("\n")):
            record = {"status": int(match.group(1)), **json.loads(match.group(2))}
            if not record["message"].startswith(PROBE):
                records.append(record)
    return records


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


LABELS = {"seeker": "Help-seeker", "supporter": "Supporter"}


def asked_for(pred: dict, records: list[dict]) -> dict:
    """The one logged request whose prompt holds `pred`'s conversation (requests arrive in any
    order: several are in flight at once)."""
    said = "\n".join(f"{LABELS[who]}: {text}" for who, text in zip(pred["speakers"], pred["context"], strict=True))
    block = f"Conversation:\nSituation: {pred['situation']}\n{said}\n\n"
    [record] = [r for r in records if block in r["message"]]
    return record


def test_sc_plus_against_star_serve_scores_the_servers_replies_in_star_evals_table(setup, server, tmp_path,
                                                                                     capsys) -> None:
    checkpoint, data = setup
    common = [str(checkpoint), "--data", str(data), "--limit", str(N), "--batch-size", str(N)]
    assert eval_cli.main([*common, "--out", str(tmp_path / "star"), "--max-new-tokens", MAX_TOKENS]) == 0
    capsys.readouterr()
    before = len(served(server))
    sc_plus = [*common, "--out", str(tmp_path / "sc"), "--responder", "openai", "--base-url", server.url + "/v1",
               "--model", MODEL_NAME, "--shots", "5", "--cache", str(tmp_path / "cache"),
               "--llm-max-tokens", MAX_TOKENS, "--backoff", "0"]
    assert eval_cli.main(sc_plus) == 0
    printed = capsys.readouterr().out

    # One request per example reached the server, each answered.
    records = served(server)[before:]
    assert len(records) == N and {r["status"] for r in records} == {200}, server.log
    scores = json.loads((tmp_path / "sc" / "scores.json").read_text())
    assert scores["responder"]["requests_sent"] == N and scores["responder"]["answers_from_cache"] == 0

    # Every reply star-eval wrote is the one the server gave to the request for that example (a
    # crisis reply of the safety layer would be the server's too), asked with STAR's strategy.
    star = read_jsonl(tmp_path / "star" / "predictions.jsonl")
    preds = read_jsonl(tmp_path / "sc" / "predictions.jsonl")
    assert len(preds) == N and [set(p) for p in preds] == [set(p) for p in star]
    assert [p["predicted_strategy"] for p in preds] == [p["predicted_strategy"] for p in star]
    matched = []
    for p in preds:
        record = asked_for(p, records)
        matched.append(id(record))
        assert record["situation"] == SYSTEM  # star-serve reads the system message as the situation
        assert f"using the strategy {p['predicted_strategy']}: " in record["message"]
        assert p["hypothesis"].strip() and p["hypothesis"] == " ".join(record["reply"].split())
        assert p["hypothesis_readable"] == p["hypothesis"]
    assert len(set(matched)) == N

    # The same table and scores as the normal mode: header, paper rows and columns; in scores.json
    # only the responder record and Table 3's paper numbers added, and no PPL.
    star_scores = json.loads((tmp_path / "star" / "scores.json").read_text())
    assert set(scores["predicted"]) == set(star_scores["predicted"]) and scores["examples"] == N
    assert set(scores) - set(star_scores) == {"responder", "paper_table_3"}
    assert set(star_scores) - set(scores) == {"teacher_forced"}
    table = (tmp_path / "sc" / "scores.md").read_text().splitlines()
    star_table = (tmp_path / "star" / "scores.md").read_text().splitlines()
    assert table[:4] == star_table[:4]
    ours = next(line for line in table if line.startswith(f"| ours: {MODEL_NAME} SC+, 5-shot, strategy by STAR |"))
    star_ours = next(line for line in star_table if line.startswith("| ours: "))
    assert ours.count("|") == star_ours.count("|") == table[0].count("|")
    assert ours.split("|")[4].strip() == "" and star_ours.split("|")[4].strip() != ""  # PPL
    assert "\n".join(table[:5]) in printed

    # A rerun asks the server nothing: every answer comes from the cache, the same predictions.
    written = (tmp_path / "sc" / "predictions.jsonl").read_text()
    assert eval_cli.main(sc_plus) == 0
    assert len(served(server)) == before + N
    scores = json.loads((tmp_path / "sc" / "scores.json").read_text())
    assert scores["responder"]["requests_sent"] == 0 and scores["responder"]["answers_from_cache"] == N
    assert (tmp_path / "sc" / "predictions.jsonl").read_text() == written
