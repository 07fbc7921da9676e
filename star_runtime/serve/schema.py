"""OpenAI's chat-completions wire format, in and out, mapped onto the runtime's own types.

In: a request body (parsed JSON) becomes a `ChatRequest`, or an `APIError` that names the field
(`param`) the way OpenAI's API does. Honoured fields:

    messages        system / developer -> the situation (joined by newlines, in order);
                    user / assistant   -> the history, the last message must be the user's;
                    content: text, or a list of {"type": "text", "text": ...} parts;
                    an assistant message may carry "strategy" (a label from the star extras)
    temperature     0..2; 0 = greedy (the runtime's greedy decoding, repetition penalty kept)
    top_p           0..1; 0 = greedy (top-p keeps only the most likely token: the same thing)
    seed            a non-negative integer: same seed and messages, same reply
    max_tokens      1..max_positions - 1 (max_completion_tokens, its newer name, wins)
    n               1 only
    stream          server-sent events; stream_options.include_usage adds the usage chunk

Absent options take the bundle's defaults (the paper's: top-p 0.3, top-k 30, temperature 0.7,
repetition penalty 1.03, 40 tokens), not OpenAI's. Every other field (model included: one model
is served) is ignored, as OpenAI's clients expect of a server.

Out: `completion`, `chunk` and `strategy_result` build the response objects; STAR's extras ride in
a top-level "star" object (the record of star_runtime.transcript.reply_record, less the text):
OpenAI's clients keep unknown fields (Python: `completion.model_extra["star"]`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from star_runtime.conversation import Reply, clean_message
from star_runtime.runtime import Runtime
from star_runtime.sampling import DecodingOptions
from star_runtime.transcript import reply_record

SITUATION_ROLES = ("system", "developer")  # "developer" is what newer OpenAI clients call "system"
HISTORY_ROLES = ("user", "assistant")
ESCALATION_HEADER = "X-STAR-Escalation"


class APIError(Exception):
    """An HTTP error as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may hold; past any of them the answer is 413."""

    max_request_bytes: int
    max_messages: int
    max_message_chars: int


@dataclass(frozen=True)
class ChatRequest:
    """A request in the runtime's terms: what `Runtime.conversation` and `reply` take."""

    situation: str | None
    history: tuple[dict[str, Any], ...]  # user / assistant messages before `message` (Conversation's format)
    message: str  # the last user message, the one to answer
    options: DecodingOptions  # max_new_tokens included
    seed: int | None
    stream: bool = False
    include_usage: bool = False


def _invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _invalid(f"{name} must be a number from {low:g} to {high:g}, not {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise _invalid(f"{name} must be an integer {bound}, not {value!r}", name)
    return value


def _content(message: Mapping[str, Any], i: int, limits: Limits) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    param = f"messages[{i}].content"
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported", param)
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise _invalid(f"content must be text, not {type(content).__name__}", param)
    if len(content) > limits.max_message_chars:
        raise APIError(413, f"a message may hold at most {limits.max_message_chars} characters; "
                       f"this one holds {len(content)}", param=param, code="message_too_long")
    return content


def parse_messages(body: object, limits: Limits, labels: list[str]) -> tuple[str | None, list[dict[str, Any]], str]:
    """(situation, history, last user message) of a request body's "messages" (module docstring)."""
    if not isinstance(body, Mapping):
        raise _invalid(f"the request body must be a JSON object, not {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    if len(messages) > limits.max_messages:
        raise APIError(413, f"a request may hold at most {limits.max_messages} messages; this one holds "
                       f"{len(messages)}", param="messages", code="too_many_messages")
    situation: list[str] = []
    history: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _invalid("each message must be an object with \"role\" and \"content\"", f"messages[{i}]")
        role = message.get("role")
        if role not in SITUATION_ROLES + HISTORY_ROLES:
            raise _invalid(f"role must be one of {', '.join(SITUATION_ROLES + HISTORY_ROLES)}, not {role!r}",
                           f"messages[{i}].role")
        content = _content(message, i, limits)
        if role in SITUATION_ROLES:
            if content.strip():
                situation.append(content)
            continue
        try:
            clean_message(content)  # the runtime's own check, here to name the message
        except ValueError as err:
            raise _invalid(f"{err}", f"messages[{i}].content") from None
        entry: dict[str, Any] = {"role": role, "content": content}
        strategy = message.get("strategy")
        if role == "assistant" and strategy is not None:
            if strategy not in labels:
                raise _invalid(f"strategy must be one of {', '.join(labels)}, not {strategy!r}",
                               f"messages[{i}].strategy")
            entry["strategy"] = strategy
        history.append(entry)
    if not history or history[-1]["role"] != "user":
        raise _invalid("the last user or assistant message must be the user's: it is the one to answer",
                       "messages")
    text = "\n".join(situation) or None
    if text is not None:
        try:
            clean_message(text)
        except ValueError as err:
            raise _invalid(f"the system message: {err}", "messages") from None
    return text, history[:-1], history[-1]["content"]


def parse_chat(body: object, limits: Limits, rt: Runtime) -> ChatRequest:
    """A /v1/chat/completions body as a ChatRequest; APIError (400, 413) naming what is wrong."""
    situation, history, message = parse_messages(body, limits, rt.spec.strategy_labels)
    assert isinstance(body, Mapping)
    if (n := _integer(body, "n", 1)) is not None and n != 1:
        raise _invalid("only n=1 is supported: one reply per request", "n")
    limit = rt.spec.max_new_tokens
    tokens = _integer(body, "max_completion_tokens", 1, limit)
    if tokens is None:
        tokens = _integer(body, "max_tokens", 1, limit)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    greedy = temperature == 0 or top_p == 0
    try:
        options = rt.options(do_sample=False if greedy else None, temperature=temperature or None,
                             top_p=top_p or None, max_new_tokens=tokens)
    except ValueError as err:
        raise _invalid(str(err)) from None
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid(f"stream must be true or false, not {stream!r}", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, Mapping):
        raise _invalid("stream_options must be an object", "stream_options")
    include_usage = bool(stream_options and stream_options.get("include_usage"))
    return ChatRequest(situation, tuple(history), message, options, _integer(body, "seed", 0), bool(stream),
                       include_usage)


def parse_strategy(body: object, limits: Limits, rt: Runtime) -> ChatRequest:
    """A /v1/strategy body ({"messages": [...]}, as for a completion) as a ChatRequest."""
    situation, history, message = parse_messages(body, limits, rt.spec.strategy_labels)
    return ChatRequest(situation, tuple(history), message, rt.options(do_sample=False), None)


# -- responses ----------------------------------------------------------------------------------


def star_extras(reply: Reply) -> dict[str, Any]:
    """STAR's part of a response: strategy, strategy_probs, escalated, escalation, timings."""
    record = reply_record(reply)
    del record["reply"]
    return record


def finish_reason(reply: Reply, max_new_tokens: int) -> str:
    """"content_filter" when the safety screen replaced the model's reply, "length" when it ran
    out of tokens, else "stop" (an answer from the safety layer is a whole reply too)."""
    if reply.escalation is not None and reply.escalation.trigger == "model_reply":
        return "content_filter"
    if not reply.escalated and len(reply.tokens) >= max_new_tokens:
        return "length"
    return "stop"


def escalation_header(reply: Reply) -> str:
    """The X-STAR-Escalation value: "none", or "CATEGORY; trigger=TRIGGER"."""
    if reply.escalation is None:
        return "none"
    return f"{reply.escalation.category}; trigger={reply.escalation.trigger}"


def usage(reply: Reply, prompt_tokens: int) -> dict[str, int]:
    """Tokens the model read and wrote (0 and 0 when the safety layer answered without it)."""
    completion_tokens = len(reply.tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(reply: Reply, *, id: str, created: int, model: str, max_new_tokens: int,
               prompt_tokens: int) -> dict[str, Any]:
    """A chat.completion object for `reply`."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": finish_reason(reply, max_new_tokens)}],
            "usage": usage(reply, prompt_tokens), "star": star_extras(reply)}


def chunk(*, id: str, created: int, model: str, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None, star: dict[str, Any] | None = None,
          usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A chat.completion.chunk: a delta, or (delta None) the usage chunk with no choices."""
    out: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [] if delta is None else [
                               {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if star is not None:
        out["star"] = star
    if usage is not None:
        out["usage"] = usage
    return out


def strategy_result(reply: Reply, *, model: str) -> dict[str, Any]:
    """The /v1/strategy answer: the distribution, or (escalated) the crisis reply to give instead."""
    return {"object": "star.strategy", "model": model, **star_extras(reply),
            "reply": reply.text if reply.escalated else None}
