"""A small OpenAI-compatible chat-completions server on loopback, for the tests of the tools that
ask an LLM (no network): it answers POST /v1/chat/completions with what the test's `answer`
function decides, and records every request it receives, so a test can count them.

    with FakeOpenAI(lambda body, n: Reply(body=completion("hello"))) as server:
        ...  --base-url server.url ...
        assert len(server.requests) == 1
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # a dict or list is sent as JSON, a str as it is
    delay: float = 0.0  # seconds to wait before answering (a timeout test waits longer than the client)
    headers: dict[str, str] = field(default_factory=dict)


def completion(text: str, prompt_tokens: int | None = 11, completion_tokens: int | None = 7) -> dict:
    """A chat completion body as OpenAI's API sends it; usage left out when the counts are None."""
    body: dict[str, Any] = {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if prompt_tokens is not None and completion_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
    return body


def user_prompt(body: dict) -> str:
    """The last user message of a request body."""
    return [m["content"] for m in body["messages"] if m["role"] == "user"][-1]


class FakeOpenAI:
    """The server, in a thread of the test process. answer(body, n) -> Reply, n = 0, 1, ... the
    request's number; `requests` and `headers` hold every request's JSON body and headers."""

    def __init__(self, answer: Callable[[dict, int], Reply]) -> None:
        self.answer = answer
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: pytest shows stderr of failures
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                with fake._lock:
                    n = len(fake.requests)
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    reply = (fake.answer(body, n) if self.path == "/v1/chat/completions"
                             else Reply(404, {"error": {"message": f"no route {self.path}"}}))
                    time.sleep(reply.delay)
                    data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data.encode())))
                    self.end_headers()
                    self.wfile.write(data.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout) before the answer
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a handler still sleeping out a timeout test does not hold the close
        # a short poll: shutdown() waits up to one poll interval, and every test starts a server
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
