"""The HTTP routes of star-serve (a Starlette app) over the decoding worker.

    GET  /health                 200 once the bundle is loaded and self-checked, with the requests in
                                 flight and queued; 503 while loading or shutting down (no key needed:
                                 load balancers probe it)
    GET  /v1/models[/{id}]       the one model served
    POST /v1/chat/completions    OpenAI's chat completions (schema.py), streamed as server-sent events
                                 with "stream": true
    POST /v1/strategy            the strategy distribution for a conversation, no reply decoded

Every answer that is not a success is OpenAI's error object (schema.APIError), tracebacks never
leave the process. A request is checked in this order: API key (401), ready and not shutting down
(503), size (413: the body, the message count, a message's length), the fields (400), room in the
queue (503 with Retry-After), then it waits for the worker within `timeout` seconds (504 past it).

Safety is the runtime's (Conversation): the situation and every user message of the history are
checked, the reply is screened before any of it is sent. A streamed reply's response starts at
its first screened piece or, for a crisis, with the crisis reply, so the X-STAR-Escalation header
is right for everything known by then; a reply the screen replaces after some of it was sent ends
with the crisis reply after a blank line, finish_reason "content_filter" and the escalation in the
last chunk's "star" (the header, sent before, said "none").

Logs carry no message text (health data) unless `log_messages`: one line per request with its
route, status, time, tokens and whether it escalated.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from star_runtime.decoding import NonFiniteOutputError
from star_runtime.json_bytes import JSONBytesError, decode_json
from star_runtime.runtime import Runtime
from star_runtime.serve import schema
from star_runtime.serve.schema import APIError, ChatRequest, Limits
from star_runtime.serve.worker import DecodeWorker, Failed, Finished, Job, Piece, QueueFull, Ticket

log = logging.getLogger("star_runtime.serve")


@dataclass
class ServerState:
    """What the routes share: the runtime and worker (None until loaded), the settings, and the
    count of requests in flight (graceful shutdown waits for it to reach 0)."""

    model_name: str
    limits: Limits
    timeout: float  # seconds per request, queue wait included
    api_keys: tuple[bytes, ...] = ()
    log_messages: bool = False
    runtime: Runtime | None = None
    worker: DecodeWorker | None = None
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _unavailable(message: str, code: str, retry_after: float = 1.0) -> APIError:
    return APIError(503, message, type="server_error", code=code,
                    headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


def _authorize(state: ServerState, request: Request) -> None:
    if not state.api_keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    token = given.strip().encode() if scheme.lower() == "bearer" else b""
    # Every key is compared, in constant time each, so the time taken says nothing about which
    # key or how much of one matched.
    matched = False
    for key in state.api_keys:
        matched |= hmac.compare_digest(token, key)
    if not matched:
        raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _ready(state: ServerState) -> tuple[Runtime, DecodeWorker]:
    if state.draining:
        raise _unavailable("the server is shutting down; retry on another replica or after it restarts",
                           "shutting_down")
    if state.runtime is None or state.worker is None:
        raise _unavailable("the model is still loading", "loading")
    return state.runtime, state.worker


async def _read_json(request: Request, limits: Limits) -> Any:
    too_large = APIError(413, f"the request body may hold at most {limits.max_request_bytes} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limits.max_request_bytes:
            raise too_large
    try:
        return decode_json(bytes(body), "the request body")
    except JSONBytesError as err:
        line = f" (line {err.line})" if err.line is not None else ""
        raise APIError(400, f"the request body is {err.problem}{line}", code="invalid_json") from None


def _failure(err: Exception) -> APIError:
    """A worker's exception as the error the client gets."""
    if isinstance(err, (ValueError, TypeError)):  # the runtime refused something in the request
        return APIError(400, str(err))
    if isinstance(err, NonFiniteOutputError):  # the bundle is broken; its message says so
        return APIError(500, str(err), type="server_error", code="model_error")
    log.error("internal error: %s", type(err).__name__)  # its message could quote the request
    return APIError(500, "internal error while decoding the reply", type="server_error", code="internal_error")


def _raise_if_failed(call: "_Call", event: object) -> None:
    """A request whose decoding failed ends as its OpenAI error (and is logged as such)."""
    if isinstance(event, Failed):
        err = _failure(event.error)
        call.done(err.status)
        raise err


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Call:
    """One admitted request: its events from the worker, its deadline, its in-flight count."""

    def __init__(self, state: ServerState, worker: DecodeWorker, job: Job, route: str) -> None:
        self.state, self.route, self.job = state, route, job
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Piece | Finished | Failed] = asyncio.Queue()
        self.deadline = self.loop.time() + state.timeout
        self.start = time.perf_counter()
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.ticket: Ticket | None = None
        try:
            self.ticket = worker.submit(job, self._sink)
        except QueueFull:
            raise _unavailable(f"the server's queue is full ({worker.waiting} requests ahead); retry later",
                               "queue_full", retry_after=worker.expected_wait()) from None
        state.in_flight += 1

    def _sink(self, event: Piece | Finished | Failed) -> None:  # on the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    async def next(self) -> Piece | Finished | Failed:
        """The worker's next event; APIError 504 past the deadline."""
        try:
            return await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - self.loop.time()))
        except asyncio.TimeoutError:
            raise APIError(504, f"no reply within the server's {self.state.timeout:g} s timeout",
                           type="server_error", code="timeout") from None

    def done(self, status: int, reply: Any = None) -> None:
        """Release the request (once): cancel the job if it still runs, count it out, log it."""
        if self.ticket is None:
            return
        self.ticket.cancel()
        self.ticket = None
        self.state.in_flight -= 1
        line = f"{self.route} {status} {(time.perf_counter() - self.start) * 1e3:.0f} ms"
        if reply is not None:
            line += f" tokens={len(reply.tokens)} escalated={str(reply.escalated).lower()}"
        if self.state.log_messages:
            r: ChatRequest = self.job.request
            line += " " + json.dumps({"situation": r.situation, "history": list(r.history), "message": r.message,
                                      "reply": None if reply is None else reply.text,
                                      "escalation": None if reply is None else schema.star_extras(reply)["escalation"]},
                                     ensure_ascii=False)
        log.info("%s", line)


def create_app(state: ServerState) -> Starlette:
    """The Starlette app over `state` (module docstring)."""

    async def health(request: Request) -> Response:
        _, worker = _ready(state)
        return JSONResponse({"status": "ok", "model": state.model_name, "in_flight": state.in_flight,
                             "queued": worker.waiting})

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "star-esc"}

    async def models(request: Request) -> Response:
        _authorize(state, request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        _authorize(state, request)
        if request.path_params["model_id"] != state.model_name:
            raise APIError(404, f"The model {request.path_params['model_id']!r} does not exist; this server "
                           f"serves {state.model_name!r}", param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def admit(request: Request, parse: Any, kind: str) -> _Call:
        _authorize(state, request)
        rt, worker = _ready(state)
        body = await _read_json(request, state.limits)
        return _Call(state, worker, Job(kind, parse(body, state.limits, rt)), f"POST {request.url.path}")

    async def strategy(request: Request) -> Response:
        call = await admit(request, schema.parse_strategy, "strategy")
        try:
            while not isinstance(event := await call.next(), (Finished, Failed)):
                pass
        except APIError as err:
            call.done(err.status)
            raise
        _raise_if_failed(call, event)
        call.done(200, event.reply)
        return JSONResponse(schema.strategy_result(event.reply, model=state.model_name),
                            headers={schema.ESCALATION_HEADER: schema.escalation_header(event.reply)})

    async def chat_completions(request: Request) -> Response:
        call = await admit(request, schema.parse_chat, "reply")
        req: ChatRequest = call.job.request
        try:
            event = await call.next()
            if req.stream:
                while isinstance(event, Piece) and not event.text:
                    event = await call.next()
            else:
                while isinstance(event, Piece):
                    event = await call.next()
        except APIError as err:
            call.done(err.status)
            raise
        _raise_if_failed(call, event)
        if not req.stream:
            assert isinstance(event, Finished)
            call.done(200, event.reply)
            body = schema.completion(event.reply, id=call.id, created=call.created, model=state.model_name,
                                     max_new_tokens=req.options.max_new_tokens, prompt_tokens=event.prompt_tokens)
            return JSONResponse(body, headers={schema.ESCALATION_HEADER: schema.escalation_header(event.reply)})
        header = schema.escalation_header(event.reply) if isinstance(event, Finished) else "none"
        return StreamingResponse(stream(call, event), media_type="text/event-stream",
                                 headers={schema.ESCALATION_HEADER: header, "Cache-Control": "no-cache"})

    async def stream(call: _Call, event: Piece | Finished | Failed) -> AsyncIterator[str]:
        req: ChatRequest = call.job.request
        ids = {"id": call.id, "created": call.created, "model": state.model_name}
        sent, status, reply = "", 200, None
        try:
            yield _sse(schema.chunk(**ids, delta={"role": "assistant", "content": ""}))
            while True:
                if isinstance(event, Piece):
                    if event.text:
                        sent += event.text
                        yield _sse(schema.chunk(**ids, delta={"content": event.text}))
                elif isinstance(event, Finished):
                    reply = event.reply
                    if reply.escalated:  # after any screened text already sent, the crisis reply
                        rest = ("\n\n" if sent else "") + reply.text
                    else:  # what the screen released last (it holds back the end of a reply)
                        rest = reply.text[len(sent):] if reply.text.startswith(sent) else ""
                    if rest:
                        yield _sse(schema.chunk(**ids, delta={"content": rest}))
                    yield _sse(schema.chunk(**ids, delta={}, finish_reason=schema.finish_reason(
                        reply, req.options.max_new_tokens), star=schema.star_extras(reply)))
                    if req.include_usage:
                        yield _sse(schema.chunk(**ids, usage=schema.usage(reply, event.prompt_tokens)))
                    break
                else:
                    err = _failure(event.error)
                    status = err.status
                    yield _sse(err.body())
                    break
                try:
                    event = await call.next()
                except APIError as err:
                    status = err.status
                    yield _sse(err.body())
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the task is cancelled): the worker stops decoding
            call.done(status if reply is not None or status != 200 else 499, reply)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: this server has /v1/chat/completions, " \
                      "/v1/strategy, /v1/models and /health"
        else:
            message = f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 \
                else str(exc.detail)
        return _error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                                        headers=exc.headers))

    def crashed(request: Request, exc: Exception) -> Response:
        # The type only: an exception's message, or a traceback's, can quote the request (health data).
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))

    def guarded(endpoint: Any) -> Any:
        """The endpoint, with any unexpected exception answered here as a 500 error object (an
        exception left to Starlette's last handler is answered too, but also logged with its
        traceback by the ASGI server)."""
        async def run(request: Request) -> Response:
            try:
                return await endpoint(request)
            except (APIError, HTTPException):
                raise
            except Exception as exc:  # noqa: BLE001
                return crashed(request, exc)
        return run

    async def on_crash(request: Request, exc: Exception) -> Response:
        return crashed(request, exc)

    return Starlette(
        routes=[Route("/health", guarded(health), methods=["GET"]),
                Route("/v1/models", guarded(models), methods=["GET"]),
                Route("/v1/models/{model_id:path}", guarded(model), methods=["GET"]),
                Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
                Route("/v1/strategy", guarded(strategy), methods=["POST"])],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash})
