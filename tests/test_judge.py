"""star-judge against a fake OpenAI-compatible server on loopback (tests/fake_openai.py): the
scores are the means and t-intervals of the answers the server gave, a rerun makes no request,
an interrupted or failed run resumes from the cache, 429s / 5xx / timeouts are retried, too many
malformed answers refuse a report, and every bad input is one line and a non-zero exit."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply, completion, user_prompt
from scipy import stats

from star_training import judge_cli
from star_training.judge import (
    CRITERIA,
    JUDGE_PROMPT,
    ParseError,
    judge_request,
    parse_scores,
    read_items,
)
from star_training.llm_client import AnswerCache, ChatClient, ChatRequest, LLMRequestError, LLMUnavailable

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("[Question]", "[Reflection of feelings]", "[Question]", "[Others]", "[Question]", "[Others]")
KEY = "sk-test-0123456789-secret"


def records(n: int = 6) -> list[dict]:
    """Records in star-eval's predictions.jsonl layout (star_training.evaluation), n distinct replies."""
    return [{"conversation": k, "turn": 1, "situation": f"situation {k}", "context": [f"i feel bad {k}"],
             "speakers": ["seeker"], "gold_strategy": "[Question]", "predicted_strategy": STRATEGIES[k % 6],
             "reference": "what happened ?", "hypothesis": f"i am sorry {k} .",
             "hypothesis_readable": f"I am sorry {k}."}
            for k in range(n)]


def write_predictions(folder: Path, recs: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def scores_for(prompt: str) -> dict[str, int]:
    """The fake judge's scores: a fixed function of the prompt, 1..10 each."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    return {f"C{k}": 1 + (h >> (8 * k)) % 10 for k in range(1, 5)}


def good(body: dict, n: int) -> Reply:
    return Reply(body=completion(json.dumps(scores_for(user_prompt(body))), prompt_tokens=100, completion_tokens=20))


def judge(pred: Path, server: FakeOpenAI, tmp: Path, *extra: str) -> int:
    return judge_cli.main([str(pred), "--base-url", server.url, "--model", "judge-m", "--cache", str(tmp / "cache"),
                           "--out", str(tmp / "out"), "--backoff", "0", *extra])


@pytest.fixture
def pred(tmp_path) -> Path:
    return write_predictions(tmp_path / "eval", records())


def t_half(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)


# -- the scores ----------------------------------------------------------------------------------------
def test_scores_are_the_means_and_t_intervals_of_the_judges_answers(pred, tmp_path, capsys) -> None:
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path) == 0
    served = [scores_for(user_prompt(b)) for b in server.requests]
    assert len(served) == 6
    report = json.loads((tmp_path / "out" / "judge.json").read_text())
    for c in CRITERIA:
        values = [float(s[c]) for s in served]
        got = report["scores"][c]
        assert got["mean"] == pytest.approx(sum(values) / 6) and got["n"] == 6
        assert (got["high"] - got["low"]) / 2 == pytest.approx(t_half(values))
    egs = [sum(s.values()) / 4 for s in served]
    assert report["scores"]["egs"]["mean"] == pytest.approx(sum(egs) / 6)

    # Per strategy: the replies written with it (records 0, 2, 4 are [Question]).
    by_prompt = {user_prompt(b): scores_for(user_prompt(b)) for b in server.requests}
    items = read_items(pred)
    question = [by_prompt[judge_request(i, temperature=0.0, max_tokens=100).messages[1][1]]
                for i in items if i.strategy == "[Question]"]
    assert report["by_strategy"]["[Question]"]["C1"]["mean"] == pytest.approx(sum(s["C1"] for s in question) / 3)
    assert set(report["by_strategy"]) == {"[Question]", "[Reflection of feelings]", "[Others]"}
    assert report["by_strategy"]["[Reflection of feelings]"]["C1"]["low"] is None  # one reply: no interval

    # Tokens: what the server reported, 100 + 20 per answer.
    assert report["tokens"]["all_answers"] == {"prompt": 600, "completion": 120, "total": 720,
                                               "answers_without_usage": 0}
    assert report["requests_sent"] == 6 and report["answers_from_cache"] == 0
    lines = (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()
    assert [json.loads(x)["scores"] for x in lines] == [by_prompt[judge_request(i, temperature=0.0, max_tokens=100)
                                                                  .messages[1][1]] for i in items]
    table = (tmp_path / "out" / "judge.md").read_text()
    c1 = report["scores"]["C1"]
    assert f"| ours: judge judge-m | {c1['mean']:.2f} ± {(c1['high'] - c1['low']) / 2:.2f} |" in table
    assert "not in this project's reference (SPEC.md)" in table and table.splitlines()[0] in capsys.readouterr().out


def test_the_prompt_holds_the_conversation_the_reply_and_the_four_criteria(pred, tmp_path) -> None:
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path, "--limit", "1") == 0
    body = server.requests[0]
    prompt = user_prompt(body)
    assert body["model"] == "judge-m" and body["temperature"] == 0 and body["max_tokens"] == 100
    assert "Situation: situation 0\nHelp-seeker: i feel bad 0\n" in prompt
    assert "Supporter: I am sorry 0." in prompt  # the reply as a person reads it
    assert all(text in prompt for text in CRITERIA.values()) and '"C4": <1-10>' in prompt
    assert prompt.startswith(JUDGE_PROMPT.split("\n")[0])


def test_reply_field_judges_another_field(pred, tmp_path) -> None:
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path, "--reply-field", "reference", "--limit", "1") == 0
    assert "Supporter: what happened ?" in user_prompt(server.requests[0])


# -- the cache: a rerun is free, an interrupted or failed run resumes --------------------------------
def test_a_rerun_makes_no_request(pred, tmp_path) -> None:
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path) == 0
        first = json.loads((tmp_path / "out" / "judge.json").read_text())
        assert len(server.requests) == 6
        assert judge(pred, server, tmp_path) == 0
        assert len(server.requests) == 6  # counted at the server: nothing new
    again = json.loads((tmp_path / "out" / "judge.json").read_text())
    assert again["scores"] == first["scores"] and again["by_strategy"] == first["by_strategy"]
    assert again["requests_sent"] == 0 and again["answers_from_cache"] == 6
    assert again["tokens"]["this_run"]["total"] == 0
    assert again["tokens"]["all_answers"] == first["tokens"]["all_answers"]


def test_a_run_that_failed_midway_resumes_with_only_the_missing_requests(pred, tmp_path, capsys) -> None:
    def three_then_down(body: dict, n: int) -> Reply:
        return good(body, n) if n < 3 else Reply(503, {"error": {"message": "overloaded"}})

    with FakeOpenAI(three_then_down) as server:
        assert judge(pred, server, tmp_path, "--concurrency", "1", "--retries", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("star-judge: error: ") and "HTTP 503" in err and "cached" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no partial report
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path) == 0
        assert len(server.requests) == 3  # the three answered before the failure came from the cache


def test_ctrl_c_stops_the_run_and_a_rerun_resumes(pred, tmp_path) -> None:
    release = threading.Event()

    def three_then_hang(body: dict, n: int) -> Reply:
        if n >= 3:
            release.wait(60)
        return good(body, n)

    env = dict(os.environ)
    if env.get("PYTHONPATH"):  # this checkout's code in the child too
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep))
    with FakeOpenAI(three_then_hang) as server:
        child = subprocess.Popen(
            [sys.executable, "-m", "star_training.judge_cli", str(pred), "--base-url", server.url, "--model", "judge-m",
             "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--concurrency", "1"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while len(server.requests) < 4 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(server.requests) == 4, child.communicate(timeout=5)
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=30)
        finally:
            release.set()
            if child.poll() is None:
                child.kill()
    assert child.returncode == 130 and err.strip().splitlines()[-1] == "star-judge: interrupted", err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path) == 0
        assert len(server.requests) == 3  # 6 replies, 3 answered before Ctrl-C


# -- retries, timeouts, the concurrency bound ------------------------------------------------------
def test_429_and_5xx_are_retried_after_the_wait_the_server_asks(pred, tmp_path) -> None:
    tries: dict[str, int] = {}

    def flaky(body: dict, n: int) -> Reply:
        prompt = user_prompt(body)
        tries[prompt] = tries.get(prompt, 0) + 1
        if tries[prompt] == 1:
            return Reply(429, {"error": {"message": "rate limited"}}, headers={"Retry-After": "0.3"})
        if tries[prompt] == 2:
            return Reply(502, "bad gateway")
        return good(body, n)

    start = time.perf_counter()
    with FakeOpenAI(flaky) as server:
        assert judge(pred, server, tmp_path, "--limit", "2") == 0
    assert time.perf_counter() - start >= 0.3  # Retry-After was waited out (--backoff 0 would not wait)
    assert len(server.requests) == 6 and set(tries.values()) == {3}
    assert json.loads((tmp_path / "out" / "judge.json").read_text())["requests_sent"] == 6


def test_a_timeout_is_retried_and_too_many_fail_with_one_line(pred, tmp_path, capsys) -> None:
    hang = threading.Event()  # set at the end, so no server thread outlives the test by much

    def slow_first(body: dict, n: int) -> Reply:
        if n == 0:
            hang.wait(30)
        return good(body, n)

    try:
        with FakeOpenAI(slow_first) as server:
            assert judge(pred, server, tmp_path, "--limit", "1", "--timeout", "1") == 0
            assert len(server.requests) == 2

        with FakeOpenAI(lambda body, n: Reply() if hang.wait(30) else Reply()) as server:
            assert judge(pred, server, tmp_path / "b", "--limit", "1", "--timeout", "0.5", "--retries", "1") == 1
            assert len(server.requests) == 2
    finally:
        hang.set()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("star-judge: error: ") and "no answer within 0.5 s" in err and "2 tries" in err


def test_requests_in_flight_never_exceed_concurrency(tmp_path) -> None:
    pred = write_predictions(tmp_path / "eval", records(9))

    def gathered(body: dict, n: int) -> Reply:
        """Held until three are in flight (5 s at most), then a little longer: room for a fourth."""
        deadline = time.monotonic() + 5
        while server.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        return good(body, n)

    with FakeOpenAI(gathered) as server:
        assert judge(pred, server, tmp_path, "--concurrency", "3") == 0
    assert len(server.requests) == 9 and server.max_in_flight == 3  # parallel, and bounded


def test_identical_requests_are_sent_once(tmp_path) -> None:
    pred = write_predictions(tmp_path / "eval", [records(1)[0]] * 3)
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path) == 0
    assert len(server.requests) == 1
    report = json.loads((tmp_path / "out" / "judge.json").read_text())
    assert report["scores"]["C1"]["n"] == 3 and report["tokens"]["all_answers"]["total"] == 120  # paid once


# -- answers that do not parse ------------------------------------------------------------------------
@pytest.mark.parametrize("answer, expected", [
    ('{"C1": 7, "C2": 10, "C3": 6, "C4": 8}', {"C1": 7, "C2": 10, "C3": 6, "C4": 8}),
    ('```json\n{"C1": 7, "C2": 10, "C3": 6, "C4": 8}\n```', {"C1": 7, "C2": 10, "C3": 6, "C4": 8}),
    ('Scores: {"c1": "7", "c2": 10.0, "C3 (positive emotion)": 6, "C4": 8} Hope this helps.',
     {"C1": 7, "C2": 10, "C3": 6, "C4": 8}),
    ('{"scores": {"C1": 1, "C2": 2, "C3": 3, "C4": 4}, "note": "ok"}', {"C1": 1, "C2": 2, "C3": 3, "C4": 4}),
])
def test_parse_scores_reads_the_criteria(answer, expected) -> None:
    assert parse_scores(answer) == expected


@pytest.mark.parametrize("answer, why", [
    ("I would rate this reply highly.", "no JSON object"),
    ('{"C1": 7, "C2": 10, "C3": 6}', "no C4"),
    ('{"C1": 11, "C2": 10, "C3": 6, "C4": 8}', "outside 1..10"),
    ('{"C1": 0, "C2": 10, "C3": 6, "C4": 8}', "outside 1..10"),
    ('{"C1": 7.5, "C2": 10, "C3": 6, "C4": 8}', "not an integer"),
    ('{"C1": true, "C2": 10, "C3": 6, "C4": 8}', "not an integer"),
    ('{"C1": 7, "c1": 7, "C2": 10, "C3": 6, "C4": 8}', "given twice"),
    ('{"C1": 7, "C2": 10, "C3": 6, "C4": 8', "no JSON object"),
])
def test_parse_scores_refuses_what_is_not_the_criteria(answer, why) -> None:
    with pytest.raises(ParseError, match=why):
        parse_scores(answer)


def malformed_every_other(body: dict, n: int) -> Reply:
    if int(user_prompt(body).split("I am sorry ")[1][0]) % 2:
        return Reply(body=completion("The reply is supportive; I give it an 8."))
    return good(body, n)


def test_too_many_unparsed_answers_refuse_the_report(pred, tmp_path, capsys) -> None:
    with FakeOpenAI(malformed_every_other) as server:
        assert judge(pred, server, tmp_path) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("star-judge: error: 3 of 6 answers (50.0%)") and "Traceback" not in err
    assert "I give it an 8." in last and "no JSON object" in last
    assert not (tmp_path / "out").exists()


def test_unparsed_answers_under_the_bound_are_left_out_of_the_means(pred, tmp_path) -> None:
    with FakeOpenAI(malformed_every_other) as server:
        assert judge(pred, server, tmp_path, "--max-unparsed", "0.5") == 0
        assert len(server.requests) == 6
    report = json.loads((tmp_path / "out" / "judge.json").read_text())
    assert report["parsed"] == 3 and report["unparsed"] == 3 and report["scores"]["C1"]["n"] == 3
    judged = [json.loads(x) for x in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert [j["scores"] is None for j in judged] == [False, True] * 3
    assert judged[1]["answer"] == "The reply is supportive; I give it an 8." and judged[1]["error"]


# -- keys, URLs and bad input ------------------------------------------------------------------------
def test_the_key_is_sent_from_the_named_variable_and_never_shown(pred, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", KEY)
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path, "--api-key-env", "JUDGE_KEY", "--limit", "1") == 0
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}"

    def refuses(body: dict, n: int) -> Reply:  # a server that echoes the key in its error, as some do
        return Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})

    with FakeOpenAI(refuses) as server:
        assert judge(pred, server, tmp_path / "b", "--api-key-env", "JUDGE_KEY", "--concurrency", "1") == 2
        assert len(server.requests) == 1  # a 401 is not retried, and it stops the run
    out, err = capsys.readouterr()
    assert "HTTP 401" in err and "***" in err and KEY not in out + err
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert KEY not in written


@pytest.mark.parametrize("make_argv, code, message", [
    (lambda t, url: [str(t / "missing.jsonl"), "--base-url", url], 2, "no such file"),
    (lambda t, url: [str(t / "bad.jsonl"), "--base-url", url], 2, "bad.jsonl:2: not JSON"),
    (lambda t, url: [str(t / "noreply.jsonl"), "--base-url", url], 2, "no reply"),
    (lambda t, url: [str(t / "eval" / "predictions.jsonl"), "--base-url", url, "--api-key-env", "NO_SUCH_VAR_X"], 2,
     "NO_SUCH_VAR_X: that environment variable is not set"),
    (lambda t, url: [str(t / "eval" / "predictions.jsonl"), "--base-url", url.removesuffix("/v1")], 2, "HTTP 404"),
    (lambda t, url: [str(t / "eval" / "predictions.jsonl"), "--base-url", url, "--cache", str(t / "eval")], 2,
     "not an LLM answer cache"),
], ids=["missing-file", "invalid-json", "no-reply-field", "missing-key-variable", "wrong-api-root", "foreign-cache"])
def test_bad_input_is_one_clear_line(make_argv, code, message, pred, tmp_path, capsys) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps(records(1)[0]) + "\n{not json\n")
    (tmp_path / "noreply.jsonl").write_text(json.dumps({"context": ["hi"], "text": "x"}) + "\n")
    with FakeOpenAI(good) as server:
        argv = make_argv(tmp_path, server.url)
        argv += [] if "--cache" in argv else ["--cache", str(tmp_path / "cache")]
        assert judge_cli.main([*argv, "--model", "m", "--out", str(tmp_path / "out"), "--retries", "0"]) == code
    err = capsys.readouterr().err
    assert err.startswith("star-judge: error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_an_unreachable_server_fails_with_one_line(pred, tmp_path, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert judge_cli.main([str(pred), "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--cache",
                           str(tmp_path / "cache"), "--retries", "1", "--backoff", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("star-judge: error: ") and "cannot connect" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://host/v1", "http://", "not a url"])
def test_a_bad_url_is_a_usage_error(url, pred, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        judge_cli.main([str(pred), "--base-url", url, "--model", "m"])
    assert exc.value.code == 2 and "--base-url" in capsys.readouterr().err


def test_outputs_it_did_not_write_are_not_replaced(pred, tmp_path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "judge.md").write_text("my notes\n")
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path) == 2
        assert server.requests == []  # refused before anything is asked
    assert (tmp_path / "out" / "judge.md").read_text() == "my notes\n"
    assert "did not write" in capsys.readouterr().err


# -- the client alone --------------------------------------------------------------------------------
def test_the_cache_is_keyed_by_model_messages_and_settings(tmp_path) -> None:
    with FakeOpenAI(good) as server:
        def ask(model: str, request: ChatRequest) -> None:
            ChatClient(server.url, model, cache=AnswerCache(tmp_path / "c"), backoff=0).complete([request])

        ask("a", ChatRequest.of([("user", "hello")]))
        ask("a", ChatRequest.of([("user", "hello")]))
        assert len(server.requests) == 1
        ask("b", ChatRequest.of([("user", "hello")]))
        ask("a", ChatRequest.of([("user", "hello!")]))
        ask("a", ChatRequest.of([("user", "hello")], temperature=0.5))
        ask("a", ChatRequest.of([("user", "hello")], max_tokens=9))
        assert len(server.requests) == 5


def test_a_200_that_is_not_a_chat_completion_is_the_urls_fault(tmp_path) -> None:
    with FakeOpenAI(lambda body, n: Reply(body={"hello": "world"})) as server:
        with pytest.raises(LLMRequestError, match="not with an OpenAI chat completion"):
            ChatClient(server.url, "m", retries=3).complete([ChatRequest.of([("user", "hi")])])
        assert len(server.requests) == 1


def test_answers_before_a_failure_are_cached(tmp_path) -> None:
    cache = AnswerCache(tmp_path / "c")
    requests = [ChatRequest.of([("user", f"q{k}")]) for k in range(4)]
    with FakeOpenAI(lambda body, n: good(body, n) if n < 2 else Reply(500, "down")) as server:
        with pytest.raises(LLMUnavailable, match="HTTP 500"):
            ChatClient(server.url, "m", cache=cache, concurrency=1, retries=0).complete(requests)
    assert sum(cache.get("m", r) is not None for r in requests) == 2


def test_a_proxy_in_the_environment_does_not_take_loopback_requests(pred, tmp_path, monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path, "--limit", "1", "--retries", "0") == 0
        assert len(server.requests) == 1


def test_a_key_a_header_cannot_carry_is_one_line(pred, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-abc def")
    with FakeOpenAI(good) as server:
        assert judge(pred, server, tmp_path, "--api-key-env", "JUDGE_KEY") == 2
        assert server.requests == []
    err = capsys.readouterr().err
    assert err.startswith("star-judge: error: --api-key-env JUDGE_KEY: the key holds characters") and "abc" not in err
