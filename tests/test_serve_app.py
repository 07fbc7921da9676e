"""star-serve's app in this process (uvicorn on a loopback port, in a thread), with the model held
or scripted: a full queue, a timeout, a client that goes away mid-stream, a reply the safety screen
replaces while it streams, a broken bundle, and the answers while the model is still loading.

The model is the shipped default bundle; where a test needs it slow or unsafe, the decoding loop
the conversation calls (star_runtime.conversation.generate) is wrapped or replaced, as
tests/test_runtime.py does for the screen.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

import star_runtime.conversation as conversation_module  # noqa: E402
from star_runtime.decoding import Generation, NonFiniteOutputError, Timings  # noqa: E402
from star_runtime.serve.app import ServerState, create_app  # noqa: E402
from star_runtime.serve.cli import bind  # noqa: E402
from star_runtime.serve.schema import Limits  # noqa: E402
from star_runtime.serve.worker import DecodeWorker  # noqa: E402

MESSAGES = [{"role": "user", "content": "I feel awful today."}]


class App:
    """The app over `state`, served by uvicorn on a free port in a thread."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def post(self, body: dict, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.state.worker is not None:
            self.state.worker.close(10)


@pytest.fixture
def make_app(shipped_rt):
    apps = []

    def make(*, max_queue: int = 8, timeout: float = 30, loaded: bool = True, batch: int = 1) -> App:
        state = ServerState("star", Limits(1 << 20, 64, 8192), timeout)
        if loaded:
            state.runtime, state.worker = shipped_rt, DecodeWorker(shipped_rt, max_queue, batch)
            state.worker.start()
        apps.append(App(state))
        return apps[-1]

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def held(monkeypatch):
    """The decoding loop waits for `held.set()` before it runs."""
    gate = threading.Event()
    real = conversation_module.steps

    def waiting(*args, **kw):
        gate.wait(60)
        return (yield from real(*args, **kw))

    monkeypatch.setattr(conversation_module, "steps", waiting)
    yield gate
    gate.set()


def _wait(predicate, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _events(response: httpx.Response) -> list[dict]:
    blocks = [b for b in response.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]", blocks[-1]
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def test_past_the_queue_requests_get_503_with_retry_after(make_app, held):
    app = make_app(max_queue=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(app.post({"messages": MESSAGES})))
               for _ in range(2)]
    for k, t in enumerate(threads, 1):
        t.start()
        _wait(lambda: app.state.worker.waiting == k)  # the first is decoding (held), the second queued
    full = app.post({"messages": MESSAGES})
    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    assert app.post({"messages": MESSAGES}, "/v1/strategy").status_code == 503  # the same queue
    held.set()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200]
    assert app.post({"messages": MESSAGES}).status_code == 200  # room again


def test_a_request_past_its_timeout_is_504_and_its_decoding_stops(make_app, held, monkeypatch):
    app = make_app(timeout=0.5)
    for stream in (False, True):
        late = app.post({"messages": MESSAGES, "stream": stream})
        error = late.json()["error"]
        assert late.status_code == 504 and (error["code"], error["type"]) == ("timeout", "server_error")
    assert app.state.in_flight == 0
    held.set()
    _wait(lambda: app.state.worker.waiting == 0)
    assert app.post({"messages": MESSAGES}).status_code == 200


def test_a_client_that_goes_away_mid_stream_stops_the_decoding(make_app, monkeypatch):
    app = make_app()
    fed = []

    def slow(engine, context, options, **kw):
        for k in range(200):
            fed.append(k)
            time.sleep(0.01)
            if (yield app.state.runtime.tokenizer.encode("fine ,")[k % 2]):
                break
        return Generation(0, np.full(8, 0.125), [], True, Timings())

    monkeypatch.setattr(conversation_module, "steps", slow)
    with httpx.stream("POST", app.url + "/v1/chat/completions", json={"messages": MESSAGES, "stream": True},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has begun
    _wait(lambda: app.state.in_flight == 0)
    _wait(lambda: app.state.worker.waiting == 0)  # the worker is free again: the reply stopped early
    assert len(fed) < 100  # 200 tokens at 10 ms: it did not decode on for nobody


def test_a_reply_the_screen_replaces_mid_stream_sends_only_screened_text(make_app, monkeypatch, shipped_rt):
    unsafe = "that sounds so hard , i understand . you should just go ahead and kill yourself tonight , ok ?"
    ids = shipped_rt.tokenizer.encode(unsafe)

    def scripted(engine, context, options, **kw):
        fed = []
        for token in ids:
            fed.append(token)
            if (yield token):
                return Generation(0, np.full(8, 0.125), fed, True, Timings())
        return Generation(0, np.full(8, 0.125), fed, False, Timings())

    monkeypatch.setattr(conversation_module, "steps", scripted)
    app = make_app()
    crisis = shipped_rt.safety.crisis_reply("suicide_self_harm")
    streamed = app.post({"messages": MESSAGES, "stream": True})
    assert streamed.headers["x-star-escalation"] == "none"  # sent with the first screened piece
    events = _events(streamed)
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    text = "".join(pieces)
    before, _, after = text.partition("\n\n")
    assert before == "That sounds so hard, I understand." and after == crisis
    model_pieces = pieces[:pieces.index("\n\n" + crisis)]
    assert "".join(model_pieces) == before  # the crisis reply came as one piece after them
    assert not any(word in piece for piece in model_pieces for word in ("kill", "yourself", "ahead"))
    final = events[-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert final["star"]["escalated"] and final["star"]["escalation"]["trigger"] == "model_reply"
    whole = app.post({"messages": MESSAGES})
    assert whole.headers["x-star-escalation"] == "suicide_self_harm; trigger=model_reply"
    assert whole.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": crisis},
                                          "logprobs": None, "finish_reason": "content_filter"}


def test_a_broken_model_is_500_and_other_failures_keep_their_words_out(make_app, monkeypatch, caplog):
    app = make_app()

    def nan(*args, **kw):
        raise NonFiniteOutputError("the model's next-token logits hold 3 NaN or infinite values")
        yield  # a generator, as decoding.steps

    monkeypatch.setattr(conversation_module, "steps", nan)
    for stream in (False, True):
        got = app.post({"messages": MESSAGES, "stream": stream})
        assert got.status_code == 500 and got.json()["error"]["code"] == "model_error"
        assert "NaN" in got.json()["error"]["message"]

    def crash(*args, **kw):
        raise KeyError("I feel awful today.")  # an exception whose message quotes the request
        yield  # a generator, as decoding.steps

    monkeypatch.setattr(conversation_module, "steps", crash)
    with caplog.at_level(logging.INFO, logger="star_runtime.serve"):
        got = app.post({"messages": MESSAGES})
    assert got.status_code == 500 and got.json()["error"]["code"] == "internal_error"
    assert "awful" not in got.text and "awful" not in caplog.text and "KeyError" in caplog.text
    assert app.state.in_flight == 0


def test_while_loading_everything_is_503(make_app):
    app = make_app(loaded=False)
    for got in (httpx.get(app.url + "/health"), app.post({"messages": MESSAGES}),
                app.post({"messages": MESSAGES}, "/v1/strategy")):
        assert got.status_code == 503 and got.json()["error"]["code"] == "loading"
    assert httpx.get(app.url + "/v1/models").status_code == 200  # it knows its name already


def test_batched_replies_are_the_replies_one_at_a_time(make_app):
    """Four requests decoded together in one batch (continuous batching) get, seed for seed, the
    replies they get one after the other; the batch's steps were shared."""
    app = make_app(batch=4)
    texts = ["I lost my job and I feel useless.", "My best friend stopped talking to me.",
             "I am so tired of arguing with my parents.", "I failed my driving test again."]
    bodies = [{"messages": [{"role": "user", "content": t}], "seed": i, "max_tokens": 24} for i, t in enumerate(texts)]
    alone = [app.post(b).json()["choices"][0]["message"]["content"] for b in bodies]
    batcher = app.state.worker.runtime.decoder
    shared_before = batcher.rows_stepped - batcher.steps
    results: list = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, app.post(bodies[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == alone
    assert batcher.rows_stepped - batcher.steps > shared_before  # some steps served several replies
