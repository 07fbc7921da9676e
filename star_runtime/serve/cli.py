"""star-serve: the OpenAI-compatible server's command line.

    star-serve [--model BUNDLE] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Order of start: the options are checked, the port is bound (a port in use is one line and exit
code 2 at once), the server starts answering (GET /health: 503 "loading"), the bundle is loaded
and self-checked in the background, then /health answers 200. A bundle that cannot be loaded is
one line on stderr and exit code 2, as with star-chat (the exit-code rule: star_runtime.cli).

Shutdown (SIGTERM, or Ctrl-C): new requests get 503 while the ones in flight finish (at most
--timeout seconds), then the process exits 0 (130 after Ctrl-C). A second signal ends it at once.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

from star_runtime.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_version
from star_runtime.runtime import BUNDLE_ENV
from star_runtime.safety import CATEGORIES
from star_runtime.terminal import printable

PROG = "star-serve"
API_KEY_ENV = "STAR_SERVE_API_KEY"  # one key, or several separated by commas
# ESConv dialogues have 29.8 utterances on average (Liu et al., 2021); 128 messages hold the long
# ones with room to spare, and bound the safety checks a request costs (each user message is
# checked, about 3 ms each on the 2-core dev machine while it was busy).
MAX_MESSAGES = 128
# Twice the 4,095 characters a terminal passes in one line: a long pasted message still fits.
MAX_MESSAGE_CHARS = 8192
MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: 128 messages of 8,192 ASCII characters and the JSON around them
# 32 waiting requests at the 169 ms of the slowest measured bundle reply (base, int8,
# docs/performance.md) is a 5.4 s wait at the back of the queue, well inside the timeout.
MAX_QUEUE = 32
# Replies decoded together on the CPU: the 8 health workers of a clinic box (docs/serve.md has
# 1 to 16). The rows' cache pages are mapped as their positions fill.
BATCH = 8
MAX_BATCH = 64  # a decoding thread per reply; 16 rows already cost 1.7x 8 rows per step (90M int8)
TIMEOUT_S = 30.0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _batch(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"at most {MAX_BATCH} replies are decoded together (a thread each), "
                                         f"not {value}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is an integer from 0 (any free port) to 65535, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Serve a STAR bundle over HTTP with OpenAI's chat-completions API "
        "(POST /v1/chat/completions, POST /v1/strategy, GET /v1/models, GET /health).")
    p.add_argument("--model", metavar="BUNDLE",
                   help=f"bundle folder from star-export (default: ${BUNDLE_ENV}, else the installed default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port; default 8000)")
    p.add_argument("--model-name", default="star", help="the model id in /v1/models and in responses (default star)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: one per core)")
    p.add_argument("--safety-config", metavar="FILE", default=None,
                   help='crisis resources: a JSON object of locale -> list of lines, with a "default" entry')
    p.add_argument("--locale", metavar="L", default="default", help="which locale's crisis resources to give")
    p.add_argument("--api-key", metavar="KEY", action="append", default=[],
                   help=f"require 'Authorization: Bearer KEY' (repeatable; or set ${API_KEY_ENV}, which a "
                   "process listing does not show)")
    p.add_argument("--timeout", type=_seconds, default=TIMEOUT_S,
                   help=f"seconds a request may take, waiting in the queue included (default {TIMEOUT_S:g})")
    p.add_argument("--batch", type=_batch, default=None, metavar="N",
                   help="replies decoded together, one decoder step for all (continuous batching; default "
                        f"{BATCH} on cpu, 1 on cuda, where batching is not built)")
    p.add_argument("--max-queue", type=_positive_int, default=MAX_QUEUE,
                   help=f"requests that may wait for the model; past it 503 with Retry-After (default {MAX_QUEUE})")
    p.add_argument("--max-request-bytes", type=_positive_int, default=MAX_REQUEST_BYTES,
                   help=f"largest request body (default {MAX_REQUEST_BYTES})")
    p.add_argument("--max-messages", type=_positive_int, default=MAX_MESSAGES,
                   help=f"most messages in one request (default {MAX_MESSAGES})")
    p.add_argument("--max-message-chars", type=_positive_int, default=MAX_MESSAGE_CHARS,
                   help=f"longest message, in characters (default {MAX_MESSAGE_CHARS})")
    p.add_argument("--log-messages", action="store_true",
                   help="log what people wrote and the replies (health data: off by default)")
    add_version(p)
    return p


def api_keys(args: argparse.Namespace) -> tuple[bytes, ...]:
    """The keys of --api-key and $STAR_SERVE_API_KEY; ValueError for an empty one."""
    keys = [*args.api_key, *(k for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())]
    if any(not k.strip() for k in args.api_key):
        raise ValueError("--api-key is empty: give the key, or leave the option out to accept every request")
    return tuple(k.strip().encode() for k in keys)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; OSError with a readable message when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {host}:{port}: unknown host ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may bind while old connections close
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        hint = {errno.EADDRINUSE: "; another process is listening there: stop it or pass another --port",
                errno.EACCES: "; ports below 1024 need privileges: pass --port 8000 or another"}.get(err.errno, "")
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}{hint}") from None
    return sock


def _fail(message: object) -> None:
    print(f"{PROG}: error:", *printable(message).split(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from star_runtime.serve.app import ServerState, create_app
    except ImportError as err:
        _fail(f"{PROG} needs the serve extra ({err.name} is missing): pip install 'star-esc[serve]'")
        return EXIT_USAGE
    from star_runtime.chat import ChatError, load_runtime
    from star_runtime.serve.schema import Limits
    from star_runtime.serve.worker import DecodeWorker

    try:
        keys = api_keys(args)
        sock = bind(args.host, args.port)
    except (ValueError, OSError) as err:
        _fail(err)
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger("star_runtime.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    state = ServerState(args.model_name, Limits(args.max_request_bytes, args.max_messages, args.max_message_chars),
                        args.timeout, keys, args.log_messages)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                            server_header=False, timeout_graceful_shutdown=5)
    server = _draining_server(config, state, drain_s=args.timeout)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("listening on http://%s:%s (loading the model; /health answers 503 until it is ready)", shown, port)
    failure: list[tuple[int, str]] = []

    def load() -> None:
        try:
            rt = load_runtime(args, threads=args.threads)
        except ChatError as err:
            failure.append((EXIT_USAGE, str(err)))
        except Exception as err:  # noqa: BLE001  a machine problem (memory): exit 1, one line
            failure.append((EXIT_FAILURE, f"cannot load the model: {type(err).__name__}: {err}"))
        else:
            # Clients send the crisis replies back in their histories: the limit must let them in.
            longest = max(len(rt.safety.crisis_reply(category)) for category in CATEGORIES)
            if longest > args.max_message_chars:
                failure.append((EXIT_USAGE, f"--max-message-chars {args.max_message_chars} is shorter than the "
                                f"longest crisis reply ({longest} characters), which clients send back in their "
                                "histories: raise it"))
                server.should_exit = True
                return
            if rt.device != "cpu" and (args.batch or 1) > 1:
                failure.append((EXIT_USAGE, f"--batch {args.batch} needs --device cpu: batched decoding is built "
                                "for the CPU only"))
                server.should_exit = True
                return
            worker = DecodeWorker(rt, args.max_queue, args.batch or (BATCH if rt.device == "cpu" else 1))
            worker.start()
            state.runtime, state.worker = rt, worker
            logger.info("ready: %s, %s bundle %s on %s", args.model_name, rt.spec.precision,
                        printable(rt.path), rt.device)
            return
        server.should_exit = True

    threading.Thread(target=load, name="star-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        sock.close()
    if failure:
        code, message = failure[0]
        _fail(message)
        return code
    if state.worker is not None:
        state.worker.close(timeout=5)
    return EXIT_INTERRUPTED if server.stopped_by == signal.SIGINT else EXIT_OK


def _draining_server(config: object, state: object, drain_s: float) -> object:
    """uvicorn's Server with a drain before it stops (module docstring). Defined in a function so
    that this module imports without uvicorn (main then says which extra to install)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.stopped_by: int | None = None
            self.drain_until: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.stopped_by is not None:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            self.stopped_by = sig
            state.draining = True  # new requests get 503 from here on
            self.drain_until = time.monotonic() + drain_s

        async def on_tick(self, counter: int) -> bool:
            if self.drain_until is not None and (state.in_flight == 0 or time.monotonic() > self.drain_until):
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer()


if __name__ == "__main__":
    sys.exit(main())
