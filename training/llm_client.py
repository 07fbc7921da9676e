"""A client for any OpenAI-compatible chat-completions endpoint (a hosted API, or a local server
such as llama.cpp's), for the tools that ask an LLM: star-judge and star-eval --responder openai.

    POST {base_url}/chat/completions   {"model", "messages", "temperature", "max_tokens"}
      -> choices[0].message.content,  usage.prompt_tokens / usage.completion_tokens

base_url is the API root as the OpenAI clients take it: https://api.openai.com/v1,
http://127.0.0.1:8080/v1 (llama.cpp's server).

- Concurrency: at most `concurrency` requests in flight, over one connection pool (an asyncio
  semaphore over one httpx.AsyncClient); identical requests in one batch are sent once.
- Retries: a 429, a 5xx, a timeout or a failed connection is tried again, up to `retries` more
  times, after backoff * 2^attempt seconds (attempt 0, 1, ...), or after the Retry-After the
  server asks for when that is longer; no wait exceeds MAX_WAIT_S. Any other 4xx (a wrong key,
  model or URL) and a 200 that is not a chat completion are the request's fault: never retried.
- Cache: every answer is written to disk the moment it arrives (AnswerCache), keyed by the
  model name, the messages and the sampling settings; a request found there is not sent. So a
  rerun costs nothing, and a run that was interrupted or failed resumes where it stopped.
- The API key is sent as `Authorization: Bearer KEY` and never printed: it is masked out of
  every message this module raises.

The model name is part of the key, the server's URL is not (a local server may change port). A
local server that answers any model name with whatever it has loaded therefore needs its own
--model name (or --cache folder) per loaded model, or old answers are reused.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from star_runtime.atomic import write_text_atomically
from star_runtime.terminal import printable
from star_training.cli_common import nonnegative_float, nonnegative_int, positive_float, positive_int

MAX_WAIT_S = 60.0  # the longest wait between two tries, whatever Retry-After asks
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))  # 408/409: OpenAI's own client retries these
CACHE_MARKER = "star-llm-cache.json"  # names a folder as an AnswerCache, so no other folder is written into
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "star-esc" / "llm"


class LLMError(Exception):
    """A request to the LLM endpoint did not give an answer; the message is one line."""


class LLMRequestError(LLMError):
    """The request is wrong: the URL, the key, the model name, the cache folder (exit 2)."""


class LLMUnavailable(LLMError):
    """The server gave no answer after every retry (exit 1); a rerun resumes from the cache."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for: messages as [{"role": ..., "content": ...}, ...]."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, in order
    temperature: float = 0.0
    max_tokens: int = 256

    @classmethod
    def of(cls, messages: Sequence[tuple[str, str]], **settings: Any) -> "ChatRequest":
        return cls(tuple((role, content) for role, content in messages), **settings)

    def payload(self, model: str) -> dict[str, Any]:
        """The JSON body of the request (also what the cache key is computed from)."""
        return {"model": model, "messages": [{"role": r, "content": c} for r, c in self.messages],
                "temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class ChatAnswer:
    text: str  # choices[0].message.content ("" when the server sent none)
    prompt_tokens: int | None  # as the server reported them (None: it did not)
    completion_tokens: int | None
    cached: bool  # read from the cache: no request was made for it


@dataclass
class TokenCount:
    """Tokens of a set of answers, as the servers reported them."""

    prompt: int = 0
    completion: int = 0
    unreported: int = 0  # answers that came without a usage record

    @classmethod
    def of(cls, answers: Sequence[ChatAnswer]) -> "TokenCount":
        """The tokens of `answers`, each answer object once (ChatClient.complete gives identical
        requests one shared answer, and they cost once)."""
        count = cls()
        for answer in {id(a): a for a in answers}.values():
            count.add(answer)
        return count

    def add(self, answer: ChatAnswer) -> None:
        if answer.prompt_tokens is None or answer.completion_tokens is None:
            self.unreported += 1
        else:
            self.prompt += answer.prompt_tokens
            self.completion += answer.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt": self.prompt, "completion": self.completion, "total": self.prompt + self.completion,
                "answers_without_usage": self.unreported}


class AnswerProgress:
    """An on_answer callback for ChatClient.complete: counts the answers (and those read from the
    cache), adds up the tokens of the fresh ones, and prints `PROG: 120/500 answers (80 from the
    cache)` on stderr at every tenth of `total` and at the last."""

    def __init__(self, prog: str, total: int, file: TextIO | None = None) -> None:
        self.prog, self.total, self.file = prog, total, file
        self.every = max(1, total // 10)
        self.answers = self.cached = 0
        self.fresh = TokenCount()  # what this run's requests cost

    def __call__(self, i: int, answer: ChatAnswer) -> None:
        self.answers += 1
        if answer.cached:
            self.cached += 1
        else:
            self.fresh.add(answer)
        if self.answers % self.every == 0 or self.answers == self.total:
            print(f"{self.prog}: {self.answers}/{self.total} answers ({self.cached} from the cache)",
                  file=self.file or sys.stderr)


def cache_key(model: str, request: ChatRequest) -> str:
    """sha256 of the request's body (model, messages, temperature, max_tokens) as canonical JSON."""
    body = json.dumps(request.payload(model), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers on disk, one JSON file per request: FOLDER/ab/abcdef....json (the key's first two
    hex digits as a subfolder keep folders small), each holding the request's body, the answer and
    its usage, written atomically. FOLDER/star-llm-cache.json marks the folder as a cache: a
    folder that holds other files and no marker is refused, so nothing else is ever written into."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if folder.exists() and not (folder / CACHE_MARKER).is_file():
            if not folder.is_dir():
                raise LLMRequestError(f"--cache {folder} is a file; give a folder")
            if any(folder.iterdir()):
                raise LLMRequestError(f"--cache {folder} holds files and is not an LLM answer cache "
                                      f"(no {CACHE_MARKER}); choose another --cache")

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, model: str, request: ChatRequest) -> ChatAnswer | None:
        path = self._path(cache_key(model, request))
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # absent (a file we write is never half-written, see atomic.py)
        if not isinstance(entry, dict) or entry.get("request") != request.payload(model) \
                or not isinstance(entry.get("text"), str):
            return None  # another request with the same hash (not with sha256), or an entry edited by hand
        return ChatAnswer(entry["text"], entry.get("prompt_tokens"), entry.get("completion_tokens"), cached=True)

    def put(self, model: str, request: ChatRequest, answer: ChatAnswer) -> None:
        if not (self.folder / CACHE_MARKER).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.folder / CACHE_MARKER,
                                  json.dumps({"format": 1, "what": "answers of an OpenAI-compatible endpoint, "
                                              "written by star_training.llm_client"}) + "\n")
        path = self._path(cache_key(model, request))
        path.parent.mkdir(exist_ok=True)
        entry = {"request": request.payload(model), "text": answer.text,
                 "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}
        write_text_atomically(path, json.dumps(entry, ensure_ascii=False) + "\n")


@dataclass
class ChatClient:
    """Chat completions of one model at one endpoint (module docstring: retries, cache, limits)."""

    base_url: str
    model: str
    api_key: str | None = None
    cache: AnswerCache | None = None
    concurrency: int = 4
    retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubled for each next one
    timeout: float = 60.0  # seconds for one request (connect, send, each read)
    requests_sent: int = field(default=0, init=False)  # HTTP requests made, retries included

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def distinct(self, requests: Sequence[ChatRequest]) -> int:
        """How many answers `complete(requests)` gives (identical requests share one)."""
        return len({cache_key(self.model, r) for r in requests})

    def complete(self, requests: Sequence[ChatRequest],
                 on_answer: Callable[[int, ChatAnswer], None] | None = None) -> list[ChatAnswer]:
        """The answers to `requests`, in their order: from the cache where there, else asked for.

        on_answer(i, answer) is called once per distinct request as its answer is known (cached
        ones first). Raises LLMRequestError or LLMUnavailable at the first request that cannot be
        answered; every answer that came before it is in the cache by then."""
        keys = [cache_key(self.model, r) for r in requests]
        first: dict[str, int] = {}  # key -> index of its first request
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        known: dict[str, ChatAnswer] = {}
        missing: list[int] = []
        for key, i in first.items():
            hit = self.cache.get(self.model, requests[i]) if self.cache else None
            if hit is None:
                missing.append(i)
            else:
                known[key] = hit
                if on_answer:
                    on_answer(i, hit)
        if missing:
            def arrived(i: int, answer: ChatAnswer) -> None:
                known[keys[i]] = answer
                if on_answer:
                    on_answer(i, answer)

            asyncio.run(self._fetch_all([(i, requests[i]) for i in missing], arrived))
        return [known[key] for key in keys]

    # -- the requests -----------------------------------------------------------------------------
    async def _fetch_all(self, todo: list[tuple[int, ChatRequest]], arrived: Callable[[int, ChatAnswer], None]) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency)
        slots = asyncio.Semaphore(self.concurrency)

        async def one(http: httpx.AsyncClient, i: int, request: ChatRequest) -> None:
            async with slots:
                answer = await self._ask(http, request)
                # cached before the slot is freed: whatever was answered survives an interruption
                if self.cache:
                    self.cache.put(self.model, request, answer)
                arrived(i, answer)

        # a proxy from the environment (HTTPS_PROXY, ...) cannot reach this machine's loopback server
        local = _is_loopback(httpx.URL(self.url).host)
        async with httpx.AsyncClient(headers=headers, timeout=self.timeout, limits=limits, trust_env=not local) as http:
            tasks = [asyncio.create_task(one(http, i, r)) for i, r in todo]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:  # the first failure (or Ctrl-C) stops the others before the pool closes
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, http: httpx.AsyncClient, request: ChatRequest) -> ChatAnswer:
        """One answer, with the retries of the module docstring."""
        why = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            self.requests_sent += 1
            try:
                response = await http.post(self.url, json=request.payload(self.model))
            except httpx.TimeoutException:
                why = f"no answer within {self.timeout:g} s (--timeout)"
            except httpx.TransportError as exc:
                why = f"cannot connect ({self._mask(str(exc)) or type(exc).__name__})"
            else:
                if response.status_code == 200:
                    return self._answer(response)
                if response.status_code not in RETRY_STATUS:
                    raise LLMRequestError(f"{self.url} answered HTTP {response.status_code}: "
                                          f"{self._excerpt(response)}; check --base-url, --model and --api-key-env")
                why = f"HTTP {response.status_code}: {self._excerpt(response)}"
                wait = max(wait, _retry_after(response))
            if attempt < self.retries:
                await asyncio.sleep(min(wait, MAX_WAIT_S))
        raise LLMUnavailable(f"{self.url}: {why}, {self.retries + 1} tries; check --base-url and that the server "
                             "runs, then run the same command again (the answers so far are cached)")

    def _answer(self, response: httpx.Response) -> ChatAnswer:
        try:
            body = response.json()
            text = body["choices"][0]["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError(text)
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMRequestError(f"{self.url} answered 200 but not with an OpenAI chat completion "
                                  f"({self._excerpt(response)}); give the API root as --base-url, e.g. "
                                  "http://127.0.0.1:8080/v1") from None
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return ChatAnswer(text, prompt if isinstance(prompt, int) else None,
                          completion if isinstance(completion, int) else None, cached=False)

    def _mask(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _excerpt(self, response: httpx.Response, limit: int = 200) -> str:
        text = " ".join(response.text.split())
        text = text if len(text) <= limit else text[:limit] + "..."
        return printable(self._mask(text)) or "(empty body)"


def display_url(url: str) -> str:
    """`url` without a user, password or query (where a key could hide), for reports and logs."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None, query=None))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(response: httpx.Response) -> float:
    """Seconds the server asks to wait (Retry-After in seconds), 0 when it asks nothing usable."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return 0.0


# -- the command-line side, shared by the tools that ask an LLM ------------------------------------
def base_url(text: str) -> str:
    """argparse type: an http(s) URL with a host, as the API root (".../v1")."""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL with a host, e.g. "
                                         f"http://127.0.0.1:8080/v1, not {text!r}")
    return text


def add_llm_args(group: argparse._ArgumentGroup, *, required: bool, max_tokens: int) -> None:
    """--base-url, --model, --api-key-env, the request limits and --cache, named alike in every tool.

    --model is stored as `llm_model` (star-eval's positional `model` is the STAR checkpoint)."""
    group.add_argument("--base-url", type=base_url, required=required,
                       help="the OpenAI-compatible API root, e.g. https://api.openai.com/v1 or "
                       "http://127.0.0.1:8080/v1")
    group.add_argument("--model", dest="llm_model", required=required, metavar="NAME",
                       help="the model name the endpoint knows, e.g. gpt-4.1-mini")
    group.add_argument("--api-key-env", metavar="VAR", default=None,
                       help="the environment variable that holds the API key (default: send no key)")
    group.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight at most (default: 4)")
    group.add_argument("--retries", type=nonnegative_int, default=5,
                       help="retries of a 429, 5xx, timeout or failed connection (default: 5)")
    group.add_argument("--backoff", type=nonnegative_float, default=1.0,
                       help="seconds before the first retry, doubled for each next one (default: 1)")
    group.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per request (default: 60)")
    group.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                       help=f"the answer cache folder: a rerun asks only what it lacks (default: {DEFAULT_CACHE})")
    group.add_argument("--llm-temperature", type=nonnegative_float, default=0.0,
                       help="the LLM's sampling temperature (default: 0, its most likely answer)")
    group.add_argument("--llm-max-tokens", type=positive_int, default=max_tokens,
                       help=f"the longest answer, in the LLM's tokens (default: {max_tokens})")


def client_from_args(args: argparse.Namespace) -> ChatClient:
    """The client the options of add_llm_args describe; the key read from $VAR, never printed."""
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise LLMRequestError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty; "
                                  f"export {args.api_key_env}=YOUR_KEY, or leave out --api-key-env for a server "
                                  "without a key")
        api_key = api_key.strip()  # a key pasted with its newline
        if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise LLMRequestError(f"--api-key-env {args.api_key_env}: the key holds characters an HTTP header cannot "
                                  "carry (spaces, control or non-ASCII characters); check the variable")
    return ChatClient(args.base_url, args.llm_model, api_key=api_key, cache=AnswerCache(args.cache),
                      concurrency=args.concurrency, retries=args.retries, backoff=args.backoff,
                      timeout=args.timeout)


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings of add_llm_args, as ChatRequest's keyword arguments."""
    return {"temperature": args.llm_temperature, "max_tokens": args.llm_max_tokens}
