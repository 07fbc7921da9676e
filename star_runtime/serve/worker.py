"""The decoding workers: `batch` threads that answer jobs, behind one bounded queue.

    submit(job, sink) -> Ticket     QueueFull when `max_queue` jobs already wait
    a worker thread:                conversation = runtime.conversation(situation, seed, history)
                                    reply -> sink(Piece(text)) for each screened piece, then
                                             sink(Finished(reply, prompt_tokens))
                                    strategy -> sink(Finished(...)) only
                                    or sink(Failed(error))
    ticket.cancel()                 a waiting job is skipped; a running one stops at its next piece

With batch > 1 the threads' conversations decode on `runtime.batched(batch)`: one decoder step
for every reply in progress (continuous batching: a reply joins at the next step after its
encoder, and leaves when it ends), so `batch` replies are in progress at once and the rest wait
in the queue. `sink` is called on the worker's thread; the server's sink hands the event to its
event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from star_runtime.conversation import Reply, clean_message
from star_runtime.runtime import Runtime
from star_runtime.serve.schema import ChatRequest

# How many recent replies the Retry-After estimate averages over.
RECENT = 32


class QueueFull(Exception):
    """The worker already has `max_queue` jobs waiting."""


@dataclass(frozen=True)
class Job:
    kind: Literal["reply", "strategy"]
    request: ChatRequest


@dataclass(frozen=True)
class Piece:
    text: str  # screened reply text (ScreenedStream passed it)


@dataclass(frozen=True)
class Finished:
    reply: Reply
    prompt_tokens: int  # the encoder input's length (0: the safety layer answered, the model did not run)


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Piece | Finished | Failed
Sink = Callable[[Event], None]


class Ticket:
    """A submitted job's handle: `cancel()` it when nobody waits for the answer any more."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class DecodeWorker:
    """Jobs in submission order, up to `batch` at once, each on a thread of its own (module docstring)."""

    def __init__(self, runtime: Runtime, max_queue: int, batch: int = 1) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, not {batch!r}")
        self.runtime = runtime.batched(batch) if batch > 1 else runtime
        self.batch = batch
        self._queue: queue.Queue[tuple[Job, Sink, Ticket] | None] = queue.Queue(maxsize=max_queue)
        self._recent: list[float] = []  # seconds per job, the last RECENT
        self._busy = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"star-decode-{i}", daemon=True)
                         for i in range(batch)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then stop the threads (waiting at most `timeout` s)."""
        alive = [thread for thread in self._threads if thread.is_alive()]
        for _ in alive:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in alive:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def submit(self, job: Job, sink: Sink) -> Ticket:
        """Queue `job`; its events go to `sink`. QueueFull when the queue is full."""
        ticket = Ticket()
        try:
            self._queue.put_nowait((job, sink, ticket))
        except queue.Full:
            raise QueueFull from None
        return ticket

    @property
    def waiting(self) -> int:
        """Jobs queued and not started, plus the ones running."""
        return self._queue.qsize() + self._busy

    def expected_wait(self) -> float:
        """Seconds until a job submitted now would start: the jobs queued ahead of it, `batch` at
        a time, times the mean of the recent ones' time (0 before any has run)."""
        mean = sum(self._recent) / len(self._recent) if self._recent else 0.0
        return (self._queue.qsize() // self.batch + (self._busy >= self.batch)) * mean

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            job, sink, ticket = item
            if ticket.cancelled:
                continue
            with self._lock:
                self._busy += 1
            start = time.perf_counter()
            try:
                sink(self._run(job, sink, ticket))
            except Exception as err:  # noqa: BLE001  the request gets an error object; the worker goes on
                sink(Failed(err))
            finally:
                with self._lock:
                    self._busy -= 1
                    self._recent = [*self._recent[-(RECENT - 1):], time.perf_counter() - start]

    def _run(self, job: Job, sink: Sink, ticket: Ticket) -> Finished:
        r = job.request
        conv = self.runtime.conversation(r.situation, r.seed, options=r.options, history=r.history)
        prompt_tokens = len(conv.context_ids(clean_message(r.message)))
        if job.kind == "strategy":
            reply = conv.strategy(r.message)
        else:
            def on_token(piece: str) -> bool:
                sink(Piece(piece))
                return not ticket.cancelled  # False stops decoding at this piece

            reply = conv.reply(r.message, on_token=on_token)
        return Finished(reply, prompt_tokens if reply.strategy is not None else 0)
