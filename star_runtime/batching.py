"""Many sequences per decoder step (continuous batching), for a server that answers many
conversations at once.

    batcher = StepBatcher(engine, rows=16)
    run = batcher.start(context_ids, capacity)   # the encoder at batch 1; the run takes a free row
    logits = run.step(token)                     # waits for the batch's next step, then returns
    run.close()                                  # the row is free for the next sequence

A conversation decodes on a thread of its own through `decoding.steps`, as with an Engine (a
StepBatcher is a `decoding.Decoder`); its run's `step` hands the token to the batcher and waits.
A step runs as soon as every row's thread has handed in its token, or when no token has come
for `window` seconds, with the rows that have: sequences join and leave between steps, and one
slow thread (a safety screen, a slow client) holds the others up by at most `window` once the
rest are in. The thread whose token completes the step runs it; the others sleep until it is done.

A step computes at least two rows (a spare idle one when a sequence is alone): onnxruntime's
matmuls take another path for a single row, whose results differ in the last bits (float32,
1e-5 on the logits) or by the activations' quantization (int8, 0.02), and from 2 rows on every
row's results are the same bits whatever the others are (measured for 2 to 16 rows).

The rows live in `DecodeBatch`'s buffers, allocated once: the self-attention cache
[R, N, C, H] per layer and kind (written in place by the step, spec.cache_pairs), the
cross-attention K, V [R, N, S, H] (S: the longest context of the rows, rounded up to
SOURCE_STEP, grown when a longer one joins; row b's first n_b are its own, the step's
source_length masks the rest: a row's results are the same bits whatever S is), STAR's state,
and the step's inputs and outputs. The
active rows are always rows 0..b-1, so a step binds the first b rows of every buffer (C-contiguous
slices, no copy); a sequence that leaves is replaced by the last row (its filled cache positions
copied). Rows are computed independently by every
op of the step, so a sequence's tokens do not depend on what else is in the batch
(tests/test_batching.py: greedy and sampled, alone and among others, token for token).

A row that has not handed in its token is computed too, at its current position, and its
results are dropped: its cache slot at that position is written with a placeholder that its own
next step overwrites, and its STAR state is put back. Cheaper than gathering the stepping rows
into a contiguous batch, which would copy their caches at every step.

CPU only: the buffers are host memory (a CUDA box serves one conversation per step).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort

from star_runtime.engine import DeviceError, Engine, _bind_shared
from star_runtime.spec import HOST_OUTPUTS, STEP_INPUTS

# How long a step waits after the last token came for rows whose token has not. A row's host work
# between two steps (choosing a sampled token from 54,952 logits: about 0.5 ms) is done by its
# own thread under the GIL, so tokens come about 0.5 ms apart while rows are still busy. (A
# deadline counted from a step's first token instead split 16 threads into steps of 1.8 rows on
# average: the GIL runs their host work one after the other.)
WINDOW_S = 0.003
# The cross buffers grow in steps of 32 key positions: at most 5 re-layouts up to the 160 a
# context holds, and at most 31 padded positions for the cross-attention to read (against 120
# for a 40-token context padded to 160, 0.6 ms of a 2.6 ms 90M step).
SOURCE_STEP = 32


def _bind_input(io: ort.IOBinding, name: str, array: np.ndarray) -> None:
    io.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


def _bind_output(io: ort.IOBinding, name: str, array: np.ndarray) -> None:
    io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class DecodeBatch:
    """The rows' buffers and the batched step over rows 0..size-1 (module docstring)."""

    def __init__(self, engine: Engine, rows: int) -> None:
        if engine.device != "cpu":
            raise DeviceError("batched decoding runs on the CPU; on CUDA, decode one conversation per step")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, not {rows!r}")
        spec = engine.spec
        self.engine, self.rows, self.size, self.capacity = engine, rows, 0, spec.max_positions
        dtype = np.dtype(spec.float_dtype)
        n, hd = spec.decoder_heads, spec.head_dim
        # np.zeros maps pages lazily: memory is spent only on the positions rows fill.
        self.cache = {past: np.zeros((rows, n, self.capacity, hd), dtype) for past in spec.cache_pairs()}
        self.source = 0  # the cross buffers' key positions: the longest context of the rows, rounded up
        self.cross: dict[str, np.ndarray] = {}
        self.state = [engine.empty_state(rows), engine.empty_state(rows)]  # [read by the next step, written by it]
        self.ids = np.full((rows, 1), spec.pad_id, np.int64)
        self.position = np.zeros(rows, np.int32)
        self.source_length = np.ones(rows, np.int32)
        self.logits = np.empty((rows, spec.output_size), np.float32)
        self.hidden = np.empty((rows, spec.d_model), np.float32)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    def add(self, cross: dict[str, ort.OrtValue], source_length: int) -> int:
        """A new sequence at position 0 in row `size`, from the encoder's outputs; returns its row."""
        if self.size == self.rows:
            raise RuntimeError("every row of the batch is taken")
        row, spec = self.size, self.engine.spec
        self._fit_source(source_length)
        for name, past in spec.cross().items():
            self.cross[past][row, :, :source_length] = cross[name].numpy()[0]
        for name, value in self.engine.empty_state(1).items():
            self.state[0][name][row] = value[0]
        self.position[row], self.source_length[row] = 0, source_length
        self.size += 1
        return row

    def remove(self, row: int) -> None:
        """Free `row`: the last row moves into it (the caller renumbers that sequence)."""
        last = self.size - 1
        if row != last:
            filled, own = self.position[last], self.source_length[last]
            for buffer in self.cache.values():
                buffer[row, :, :filled] = buffer[last, :, :filled]
            for buffer in self.cross.values():
                buffer[row, :, :own] = buffer[last, :, :own]
            for buffer in self.state[0].values():
                buffer[row] = buffer[last]
            self.position[row], self.source_length[row] = filled, own
        # The freed row may be stepped as the spare one: it must read inside the buffers.
        self.position[last], self.source_length[last] = 0, 1
        self.size = last
        if self.size == 0:  # the next rows start from buffers of their own length
            self.cross, self.source = {}, 0
            self._bindings.clear()

    def _fit_source(self, length: int) -> None:
        """Cross buffers with room for `length` key positions (the rows' own ones copied over)."""
        if length <= self.source:
            return
        spec = self.engine.spec
        source = min(spec.max_source_length, -(-length // SOURCE_STEP) * SOURCE_STEP)
        shape = (self.rows, spec.decoder_heads, source, spec.head_dim)
        cross = {past: np.zeros(shape, np.dtype(spec.float_dtype)) for past in spec.cross().values()}
        for past, old in self.cross.items():
            cross[past][:self.size, :, :self.source] = old[:self.size]
        self.cross, self.source = cross, source
        self._bindings.clear()  # they point into the old buffers

    def step(self, tokens: dict[int, int]) -> None:
        """One decoder step for rows 0..size-1: row r reads tokens[r] at its position; rows not in
        `tokens` keep their position and state (module docstring). Results: logits[r], hidden[r]."""
        b = min(max(self.size, 2), self.rows)  # two rows at least: the module docstring says why
        idle = np.array([r for r in range(b) if r not in tokens], np.int64)
        for row, token in tokens.items():
            self.ids[row, 0] = token
        full = idle[self.position[idle] >= self.capacity]
        self.position[full] = self.capacity - 1  # a full row never steps again: its last slot is free to write
        try:
            self.engine.step.run_with_iobinding(self._binding(b))
        finally:
            self.position[full] = self.capacity
        current, following = self.state
        for name, buffer in current.items():
            following[name][idle] = buffer[idle]
        self.state.reverse()
        self.position[list(tokens)] += 1

    def _binding(self, b: int) -> ort.IOBinding:
        """The step's binding to the first b rows of every buffer, one per (b, state buffer)."""
        key = (b, id(self.state[0]))
        if (io := self._bindings.get(key)) is None:
            engine, spec = self.engine, self.engine.spec
            io = engine.step.io_binding()
            for name, array in zip(STEP_INPUTS, (self.ids, self.position, self.source_length)):
                _bind_input(io, name, array[:b])
            _bind_shared(io, engine.step, engine.inputs)
            for past, buffer in self.cross.items():
                _bind_input(io, past, buffer[:b])
            for past, present in spec.cache_pairs().items():
                _bind_input(io, past, self.cache[past][:b])
                _bind_output(io, present, self.cache[past][:b])
            current, following = self.state
            for present, past in spec.recurrent().items():
                _bind_input(io, past, current[past][:b])
                _bind_output(io, present, following[past][:b])
            for name, buffer in zip(HOST_OUTPUTS, (self.logits, self.hidden)):
                _bind_output(io, name, buffer[:b])
            self._bindings[key] = io
        return io


class BatchedRun:
    """One sequence's row of a StepBatcher: the `decoding.Run` interface (`step`, `logits`,
    `hidden`, `position`, `close`). Its logits and hidden are its own copies."""

    def __init__(self, batcher: StepBatcher, row: int, capacity: int) -> None:
        spec = batcher.spec
        self.row, self.position, self.capacity = row, 0, capacity
        self.logits = np.empty(spec.output_size, np.float32)
        self.hidden = np.empty(spec.d_model, np.float32)
        self._batcher, self._done, self._error, self._closed = batcher, False, None, False

    def step(self, token_id: int) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the run is closed")
        if self.position >= self.capacity:
            raise ValueError(f"the run holds {self.capacity} positions and all are used")
        self._batcher._step(self, int(token_id))
        return self.logits

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._batcher._close(self)


class StepBatcher:
    """Sequences on many threads decoded together, one batched step for all (module docstring).

    A `decoding.Decoder`: `spec`, `strategy_logits`, `output_ids`, `to_output` and `start` as an Engine's. `steps` counts
    the batched steps run and `rows_stepped` the sequences' steps they served.
    """

    def __init__(self, engine: Engine, rows: int = 16, window: float = WINDOW_S) -> None:
        self.engine, self.spec, self.strategy_logits = engine, engine.spec, engine.strategy_logits
        self.output_ids, self.to_output = engine.output_ids, engine.to_output
        self.window = window
        self._batch = DecodeBatch(engine, rows)
        self._cond = threading.Condition()
        self._runs: list[BatchedRun] = []  # by row
        self._pending: dict[BatchedRun, int] = {}  # tokens handed in for the next step
        self._last = 0.0  # when the last token came (or the last step ended)
        self._stepping = False
        self.steps = self.rows_stepped = 0

    @property
    def rows(self) -> int:
        return self._batch.rows

    def start(self, context_ids: np.ndarray, capacity: int | None = None) -> BatchedRun:
        """The encoder on context ids [1, S] (S <= max_source_length), then a row at position 0 (waits
        while every row is taken)."""
        spec = self.spec
        context = np.ascontiguousarray(np.asarray(context_ids, np.int64).reshape(1, -1))
        if not 1 <= context.shape[1] <= spec.max_source_length:
            raise ValueError(f"a batched context holds 1..{spec.max_source_length} tokens, not {context.shape[1]}")
        capacity = capacity or spec.max_positions
        if not 1 <= capacity <= spec.max_positions:
            raise ValueError(f"capacity must be in 1..{spec.max_positions}, not {capacity}")
        cross = self.engine.encode(context)  # outside the lock: encoders run beside the steps
        with self._cond:
            while self._stepping or self._batch.size == self._batch.rows:
                self._cond.wait()
            run = BatchedRun(self, self._batch.add(cross, context.shape[1]), capacity)
            self._runs.append(run)
            self._cond.notify_all()
        return run

    def _step(self, run: BatchedRun, token: int) -> None:
        with self._cond:
            self._last = time.monotonic()
            self._pending[run] = token
            self._cond.notify_all()
            while not run._done:
                if self._stepping or not self._pending:
                    self._cond.wait()
                    continue
                left = self._last + self.window - time.monotonic()
                if len(self._pending) < len(self._runs) and left > 0:
                    self._cond.wait(left)
                else:
                    self._lead()
            run._done, error, run._error = False, run._error, None
        if error is not None:
            raise error

    def _lead(self) -> None:
        """Run the step for the pending rows; called, and returns, with the lock held."""
        pending, self._pending, self._stepping = self._pending, {}, True
        self._cond.release()
        error: BaseException | None = None
        try:
            self._batch.step({run.row: token for run, token in pending.items()})
        except BaseException as err:  # noqa: BLE001  every waiting row gets it, the batcher goes on
            error = err
        finally:
            self._cond.acquire()
        self._stepping, self._last = False, time.monotonic()
        for run in pending:
            if error is None:
                run.logits[:] = self._batch.logits[run.row]
                run.hidden[:] = self._batch.hidden[run.row]
                run.position += 1
            run._error, run._done = error, True
        self.steps += 1
        self.rows_stepped += len(pending)
        self._cond.notify_all()

    def _close(self, run: BatchedRun) -> None:
        with self._cond:
            while self._stepping:
                self._cond.wait()
            self._pending.pop(run, None)
            self._batch.remove(run.row)
            last = self._runs.pop()
            if last is not run:
                self._runs[run.row], last.row = last, run.row
            self._cond.notify_all()
