"""star-serve as a real process on loopback: OpenAI's own client, raw HTTP for every error, a load test.

The server runs the shipped default bundle with one thread, as the in-test `Runtime` does, so that
greedy replies through the server can be compared token for token with the runtime called
directly. What needs a slow or blocked model (a full queue, a timeout, a reply the screen
replaces mid-stream) is driven in-process: tests/test_serve_app.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_process import SERVE, START_S, Server

openai = pytest.importorskip("openai")

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def server():
    srv = Server("--max-messages", "12", "--max-message-chars", "1000", "--max-request-bytes", "16384",
                 env={"STAR_SERVE_API_KEY": f"other-key, {KEY}"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, *, key: str | None = KEY, headers: dict | None = None) -> httpx.Response:
    headers = {**({} if key is None else {"Authorization": key if key.startswith("Basic ") else f"Bearer {key}"}),
               **(headers or {})}
    if isinstance(body, (bytes, str)) or callable(getattr(body, "__next__", None)):
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# -- OpenAI's client, only base_url changed ---------------------------------------------------------

def test_a_greedy_reply_is_the_runtimes_reply(client, shipped_rt):
    messages = [{"role": "system", "content": "I lost my job last month."}, user("I can't sleep at night.")]
    raw = client.chat.completions.with_raw_response.create(model="star", messages=messages, temperature=0)
    completion = raw.parse()
    direct = shipped_rt.conversation(situation="I lost my job last month.", do_sample=False).reply("I can't sleep at night.")
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == direct.text
    assert choice.finish_reason == "stop" and completion.model == "star"
    star = completion.model_extra["star"]
    assert star["strategy"] == direct.strategy and star["escalated"] is False and star["escalation"] is None
    assert star["strategy_probs"] == pytest.approx(direct.strategy_probs, abs=1e-6)
    assert completion.usage.completion_tokens == len(direct.tokens)
    assert raw.headers["x-star-escalation"] == "none"


def test_streaming_gives_the_same_reply_in_chunks_ending_with_done(client, server):
    messages = [user("My best friend moved away and I feel alone.")]
    whole = client.chat.completions.create(model="star", messages=messages, seed=7, max_tokens=30)
    stream = client.chat.completions.create(model="star", messages=messages, seed=7, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["star"]["strategy"] == whole.model_extra["star"]["strategy"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = post(server, "/v1/chat/completions", {"messages": messages, "stream": True, "seed": 7, "max_tokens": 30})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_sampling_options_are_honoured(client):
    messages = [user("I failed my exam and my parents are angry.")]
    ask = lambda **kw: client.chat.completions.create(model="star", messages=messages, **kw)  # noqa: E731
    a, b = ask(seed=3, temperature=1.5, top_p=1), ask(seed=3, temperature=1.5, top_p=1)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same reply
    replies = {ask(seed=s, temperature=1.5, top_p=1).choices[0].message.content for s in range(6)}
    assert len(replies) > 1  # the seed and the temperature reach the sampler
    short = ask(max_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    assert ask(temperature=0).choices[0].message.content == ask(top_p=0).choices[0].message.content  # both greedy
    ok = ask(n=1, temperature=0, frequency_penalty=0.5, user="ignored", extra_body={"some_future_field": 1})
    assert ok.choices[0].message.content


def test_a_conversation_through_the_server_is_the_runtimes_conversation(client, shipped_rt):
    """Five turns, the client keeping the history as OpenAI's clients do (role and content)."""
    live = shipped_rt.conversation(situation="I am a nurse and I am exhausted.", do_sample=False)
    messages = [{"role": "system", "content": "I am a nurse and I am exhausted."}]
    for text in ["I work night shifts.", "I never see my kids.", "My manager wants more hours.",
                 "I think about quitting.", "But we need the money."]:
        messages.append(user(text))
        got = client.chat.completions.create(model="star", messages=messages, temperature=0)
        want = live.reply(text)
        assert got.choices[0].message.content == want.text
        assert got.model_extra["star"]["strategy"] == want.strategy
        messages.append({"role": "assistant", "content": got.choices[0].message.content})


# -- safety -------------------------------------------------------------------------------------------

def test_a_crisis_anywhere_escalates_and_says_so(client, server, shipped_rt):
    policy = shipped_rt.safety
    cases = [  # (messages, trigger, category)
        ([user("I want to kill myself tonight")], "user_message", "suicide_self_harm"),
        ([{"role": "system", "content": "She took a whole bottle of pills an hour ago."}, user("hi")],
         "situation", "medical_emergency"),
        ([user("my husband hits me and I am scared to go home"), {"role": "assistant", "content": "I see."},
          user("anyway, how are you?")], "history", "abuse_safeguarding"),
    ]
    for messages, trigger, category in cases:
        for stream in (False, True):
            raw = post(server, "/v1/chat/completions", {"messages": messages, "stream": stream})
            assert raw.status_code == 200
            assert raw.headers["x-star-escalation"] == f"{category}; trigger={trigger}"
            if stream:
                data = [json.loads(e[6:]) for e in raw.text.split("\n\n") if e and e != "data: [DONE]"]
                text = "".join(d["choices"][0]["delta"].get("content") or "" for d in data if d["choices"])
                star = data[-1]["star"]
            else:
                text, star = raw.json()["choices"][0]["message"]["content"], raw.json()["star"]
            assert text == policy.crisis_reply(category)
            assert star["escalated"] and star["strategy"] is None and star["escalation"]["trigger"] == trigger
            assert "matched" not in star["escalation"]  # the person's words stay out of the response's extras
    # The crisis reply, kept in the history as the client was given it, answers the crisis.
    answered = [user("I want to kill myself tonight"),
                {"role": "assistant", "content": policy.crisis_reply("suicide_self_harm")}, user("thank you")]
    after = client.chat.completions.create(model="star", messages=answered, temperature=0)
    assert after.model_extra["star"]["escalated"] is False


def test_strategy_endpoint_gives_the_distribution_without_a_reply(server, shipped_rt):
    messages = [{"role": "system", "content": "I lost my job."}, user("I can't sleep."),
                {"role": "assistant", "content": "That sounds hard."}, user("What should I do?")]
    got = post(server, "/v1/strategy", {"model": "star", "messages": messages})
    assert got.status_code == 200, got.text
    body = got.json()
    want = shipped_rt.conversation(situation="I lost my job.", history=[{k: m[k] for k in ("role", "content")}
                                                                        for m in messages[1:3]]).strategy(messages[3]["content"])
    assert body["object"] == "star.strategy" and body["strategy"] == want.strategy and body["reply"] is None
    assert body["strategy_probs"] == pytest.approx(want.strategy_probs, abs=1e-6)
    crisis = post(server, "/v1/strategy", {"messages": [user("I want to end my life")]}).json()
    assert crisis["escalated"] and crisis["strategy"] is None and crisis["strategy_probs"] == {}
    assert crisis["reply"] == shipped_rt.safety.crisis_reply("suicide_self_harm")


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["star"]
    assert client.models.retrieve("star").id == "star"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx.get(server.url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


# -- every error, raw HTTP ----------------------------------------------------------------------------

def _error(response: httpx.Response, status: int, param: str | None = "*", code: str | None = "*") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in error["message"]
    if param != "*":
        assert error["param"] == param, error
    if code != "*":
        assert error["code"] == code, error
    return error


def test_api_keys_are_required_and_compared(server, client):
    body = {"messages": [user("hi")]}
    for key in (None, "wrong", KEY + "x", KEY[:-1], "Basic " + KEY):
        err = _error(post(server, "/v1/chat/completions", body, key=key), 401, code="invalid_api_key")
        assert err["type"] == "invalid_request_error"
    assert _error(httpx.get(server.url + "/v1/models"), 401)
    assert post(server, "/v1/chat/completions", body, key="other-key").status_code == 200  # either key of the env var
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body, param, fragment", [
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({}, "messages", "non-empty list"),
    ([1, 2], None, "JSON object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "role must be"),
    ({"messages": [user("hi"), {"role": "assistant", "content": "hello"}]}, "messages", "must be the user's"),
    ({"messages": [{"role": "system", "content": "only a situation"}]}, "messages", "must be the user's"),
    ({"messages": [user("   ")]}, "messages[0].content", "empty message"),
    ({"messages": [user("ab" + "\ufffd" * 6)]}, "messages[0].content", "binary data"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "text content parts"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "content must be text"),
    ({"messages": [user("hi"), {"role": "assistant", "content": "x", "strategy": "Hug"}, user("hi")]},
     "messages[1].strategy", "strategy must be"),
    ({"messages": [user("hi")], "n": 2}, "n", "n=1"),
    ({"messages": [user("hi")], "temperature": 3}, "temperature", "from 0 to 2"),
    ({"messages": [user("hi")], "temperature": "hot"}, "temperature", "number"),
    ({"messages": [user("hi")], "top_p": 1.5}, "top_p", "from 0 to 1"),
    ({"messages": [user("hi")], "seed": -1}, "seed", ">= 0"),
    ({"messages": [user("hi")], "seed": 1.5}, "seed", "integer"),
    ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens", "from 1 to 511"),
    ({"messages": [user("hi")], "max_tokens": 512}, "max_tokens", "from 1 to 511"),
    ({"messages": [user("hi")], "stream": "yes"}, "stream", "true or false"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param, fragment):
    err = _error(post(server, "/v1/chat/completions", body), 400, param=param)
    assert fragment in err["message"], err
    if not isinstance(body, dict) or set(body) <= {"messages"}:  # /v1/strategy reads the messages only
        _error(post(server, "/v1/strategy", body), 400, param=param)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b"[" * 3000 + b"]" * 3000, b""])
def test_a_body_that_is_not_json_is_400(server, raw):
    _error(post(server, "/v1/chat/completions", raw, headers={"Content-Type": "application/json"}), 400)


def test_limits_are_413(server):
    big = {"messages": [user("x" * 100)] * 5 + [user("y" * 20000)]}
    _error(post(server, "/v1/chat/completions", big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(40):
            yield b" " * 1024
    _error(post(server, "/v1/chat/completions", chunks()), 413, code="request_too_large")
    many = {"messages": [user("hi"), {"role": "assistant", "content": "hello"}] * 6 + [user("hi")]}  # 13 > 12
    _error(post(server, "/v1/chat/completions", many), 413, param="messages", code="too_many_messages")
    long = {"messages": [user("a" * 1001)]}
    _error(post(server, "/v1/chat/completions", long), 413, param="messages[0].content", code="message_too_long")
    _error(post(server, "/v1/strategy", long), 413)


def test_unknown_routes_and_methods_are_error_objects(server):
    _error(httpx.get(server.url + "/v1/completions"), 404, code="not_found")
    _error(httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)
    _error(httpx.delete(server.url + "/health"), 405)


def test_no_message_text_in_the_logs(server):
    secret = "my neighbour Zebedee keeps me awake"
    assert post(server, "/v1/chat/completions", {"messages": [user(secret)]}).status_code == 200
    assert post(server, "/v1/chat/completions", {"messages": [user("I want to kill myself")]}).status_code == 200
    time.sleep(0.2)
    assert "POST /v1/chat/completions 200" in server.log
    assert "Zebedee" not in server.log and "kill" not in server.log and "suicide" not in server.log


# -- load ---------------------------------------------------------------------------------------------

def test_sixteen_concurrent_conversations_all_get_their_replies(server, client):
    """16 clients at once, 3 turns each (48 requests, 32 queue places): every reply arrives, each
    client's greedy conversation is the one it would have alone, and the server stays healthy."""
    def converse(k: int) -> list[str]:
        messages, replies = [], []
        for turn in range(3):
            messages.append(user(f"Client {k}, turn {turn}: I feel stressed about work."))
            got = client.chat.completions.create(model="star", messages=messages, temperature=0, max_tokens=20)
            replies.append(got.choices[0].message.content)
            messages.append({"role": "assistant", "content": replies[-1]})
        return replies

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(converse, range(16)))
    assert time.monotonic() - start < 120
    assert together[5] == converse(5) and all(all(r for r in replies) for replies in together)
    health = httpx.get(server.url + "/health").json()
    assert (health["status"], health["in_flight"], health["queued"]) == ("ok", 0, 0)


# -- the process: start, shutdown, command-line errors ------------------------------------------------

def test_graceful_shutdown_finishes_replies_in_flight_and_refuses_new_ones():
    srv = Server("--api-key", KEY, "--log-messages", "--max-queue", "64")
    try:
        srv.wait_ready()
        body = {"messages": [user("Zebedee keeps me awake at night, I am so tired.")], "max_tokens": 40}
        with ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(post, srv, "/v1/chat/completions", body) for _ in range(40)]
            deadline = time.monotonic() + 60
            while httpx.get(srv.url + "/health").json()["in_flight"] < 20 and time.monotonic() < deadline:
                time.sleep(0.005)
            srv.proc.send_signal(signal.SIGTERM)
            try:
                refused = post(srv, "/v1/chat/completions", body)
            except httpx.TransportError:  # the drain finished first: the port is closed
                refused = None
            done = [f.result() for f in futures]
        assert refused is not None, "the server closed before a request could be sent during its drain"
        err = _error(refused, 503, code="shutting_down")
        assert int(refused.headers["retry-after"]) >= 1 and err["type"] == "server_error"
        admitted = [r for r in done if r.status_code != 503]
        assert len(admitted) >= 20 and all(r.status_code == 200 for r in admitted)  # in flight: all finished
        assert srv.proc.wait(60) == 0
        assert "Zebedee" in srv.log  # --log-messages: the text is logged when asked for
    finally:
        srv.stop(signal.SIGKILL)


def _one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in done.stderr, done.stderr


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STAR_BUNDLE"}
    run = lambda *a: subprocess.run([*SERVE, *a], capture_output=True, text=True, timeout=START_S, env=env)  # noqa: E731
    _one_line_error(run("--port", "0", "--model", str(tmp_path / "nope")), "nope")
    _one_line_error(run("--port", "0", "--model", ""), "--model is empty")
    _one_line_error(run("--port", "0", "--max-message-chars", "100"), "shorter than the longest crisis reply")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        _one_line_error(run("--port", str(busy.getsockname()[1])), "already in use")
    for bad in (["--port", "http"], ["--port", "70000"], ["--timeout", "0"], ["--max-queue", "-1"],
                ["--device", "tpu"], ["--api-key", ""], ["--batch", "0"], ["--batch", "65"]):
        done = run(*bad)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (bad, done.stderr)


def test_without_the_serve_extra_it_says_what_to_install(tmp_path):
    code = ("import sys\nsys.modules['uvicorn'] = None\nsys.modules['starlette'] = None\n"
            "from star_runtime.serve.cli import main\nsys.exit(main(['--port', '0']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=START_S)
    _one_line_error(done, "pip install 'star-esc[serve]'")
    # The runtime and the server's own modules import without the server libraries.
    plain = subprocess.run([sys.executable, "-c", "import sys, star_runtime, star_runtime.serve.schema, "
                            "star_runtime.serve.worker, star_runtime.serve.cli; "
                            "print(sorted({'starlette', 'uvicorn'} & set(sys.modules)))"],
                           capture_output=True, text=True, timeout=START_S)
    assert plain.stdout.strip() == "[]", plain.stderr
