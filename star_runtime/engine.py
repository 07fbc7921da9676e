"""onnxruntime sessions for a bundle's two graphs, and one decoding position at a time.

    engine = Engine.open(folder, manifest, device="cpu")
    run = engine.start(context_ids)                       # encoder once: cross K/V of every layer
    run.step(bos_id); p = engine.strategy_logits(run.hidden)  # position 0: h_0 -> the strategy
    logits = run.step(strategy_token)                     # position 1: h'_1 -> first response token
    ...

Memory: the token embedding, read by both graphs, is one read-only mapping of weights.bin that
both sessions use (star_runtime.bundle.read_shared_tensors): float bundles with the whole LM head
take E^T as a graph input (bound to the same value in every run, so never copied or prepacked);
the others get E (float, trimmed head) or E_q (int8) with `SessionOptions.add_initializer`.
Every other weight belongs to one graph only. The strategy head (8 rows of the LM head, used once
per reply) is taken from that array too: `StrategyHead`.

A `DecodeRun` keeps one sequence's state on the device: the self-attention KV cache is written
in place by the step, STAR's pooling state goes from one step's outputs to the next step's inputs
through IO binding (on CUDA neither leaves the GPU); the cross-attention K/V and the embedding are
bound once per turn. The host reads only the logits and h, into buffers allocated once per run.
star_runtime.batching decodes many sequences per step with the same graph.

Sessions are shared: onnxruntime's `run` may be called from several threads at once, and all
per-sequence state is in the `DecodeRun`, so one `Engine` serves many conversations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from star_runtime.bundle import (FINGERPRINT_KEY, PRECISIONS, BundleError, contained, read_shared_tensors,
                                 weights_fingerprint)
from star_runtime.spec import HOST_OUTPUTS, OUTPUT_IDS, STAR_STATE, STEP_INPUTS, BundleSpec, star_names

EMPTY_MAX = -1e30  # STAR's empty running max (kernels/state.py); float16 clamps it to -65504
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class DeviceError(BundleError):
    """The requested device cannot run this bundle (no such provider, or the wrong precision)."""


def session_options(threads: int | None = None, profile_prefix: str | None = None) -> ort.SessionOptions:
    """Options for batch-1 decoding on a small CPU: intra-op threads one per core (default), ops
    one after the other (a step is a chain of ops with no parallel branches worth a second pool),
    idle pool threads asleep instead of spinning."""
    # Spinning made a float32 step 1.5-2x slower on the shared 2-core CPU (48 decoder matmuls:
    # 13.9 ms spinning, 7.4 ms not), and a spinning thread steals the core the app's threads need.
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # unused-initializer warnings are expected
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return so


def providers_for(device: str, precision: str, *, check_precision: bool = True) -> list[Any]:
    """The onnxruntime providers for `device`, or a DeviceError that says what is missing.

    check_precision=False lets a float16 bundle run on the CPU, where onnxruntime computes the
    float16 ops in float32 through inserted Casts: slow, but the exporter's self-check uses it
    on machines without CUDA.
    """
    if device not in _PROVIDERS:
        raise DeviceError(f"unknown device {device!r}; choose 'cpu' or 'cuda'")
    if check_precision and device not in PRECISIONS[precision]:
        raise DeviceError(
            f"a {precision} bundle runs on {' or '.join(PRECISIONS[precision])}, not {device}: "
            + ("export with --fp16 (or float32) for CUDA" if device == "cuda" else "export without --fp16 for CPU")
        )
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise DeviceError(
                "device='cuda' needs onnxruntime-gpu with CUDA (pip install 'star-esc[gpu]'); this onnxruntime "
                f"{ort.__version__} offers {', '.join(available)}"
            )
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class StrategyHead:
    """strategy_logits = W h_0 + b: the LM head's 8 strategy rows, W [8, d], b [8] (float64)."""

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def from_shared(cls, spec: BundleSpec, shared: dict[str, np.ndarray]) -> StrategyHead:
        ids = list(spec.strategy_token_ids)
        if "embed.weight_t" in shared:  # float bundles with the whole LM head: E^T [d, V]
            weight = shared["embed.weight_t"][:, ids].T
        elif "embed.weight.scale" not in shared:  # float, trimmed head: E [V, d]
            weight = shared["embed.weight"][ids]
        else:  # int8: E_q uint8 [V, d/B, B] and scales [V, d/B] (export/weights.py)
            q, scale = shared["embed.weight"][ids].astype(np.float64), shared["embed.weight.scale"][ids]
            weight = ((q - 128) * scale[..., None]).reshape(len(ids), -1)
        return cls(weight.astype(np.float64), np.asarray(spec.strategy_logit_bias, np.float64))

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        return self.weight @ hidden + self.bias


@dataclass
class Engine:
    manifest: dict[str, Any]
    spec: BundleSpec
    device: str
    encoder: ort.InferenceSession
    step: ort.InferenceSession
    inputs: dict[str, ort.OrtValue]  # shared tensors bound as graph inputs, on the device
    strategy_logits: StrategyHead
    output_ids: np.ndarray  # [V_out] int64: the vocabulary id of each logit the step computes
    output_index: np.ndarray  # [V] int64: the logit of each vocabulary id, -1 where the head has none
    _keep: tuple  # the arrays and values the sessions point into: they must outlive the sessions

    @classmethod
    def open(cls, folder: str | os.PathLike[str], manifest: dict[str, Any], device: str = "cpu",
             threads: int | None = None, profile_prefix: str | None = None,
             check_precision: bool = True) -> Engine:
        """Sessions for the bundle in `folder`; profile_prefix: write onnxruntime's per-op profile
        (JSON, one file per graph) to files starting with it, for benchmarks/profile_bundle.py.

        The manifest's fingerprint must be weights.bin's and both graphs' (one export's graphs and
        weights): a mixed pair is refused before it can compute garbage.
        """
        folder = Path(folder)
        providers = providers_for(device, manifest["precision"], check_precision=check_precision)
        if weights_fingerprint(folder, manifest) != manifest["fingerprint"]:
            raise BundleError(f"{folder}: {manifest['graphs']['weights']} does not carry the manifest's fingerprint: "
                              "it comes from another export; copy the whole bundle folder, not single files")
        arrays = read_shared_tensors(folder, manifest)
        bindings = {name: spec["binding"] for name, spec in manifest["shared_tensors"].items()}
        # The options keep raw pointers to initializer values: dropping the OrtValue before the
        # session is created crashed onnxruntime 1.32, hence `_keep`.
        initializers = {n: ort.OrtValue.ortvalue_from_numpy(a)
                        for n, a in arrays.items() if bindings[n] == "initializer"}
        inputs = {n: ort.OrtValue.ortvalue_from_numpy(a, device) for n, a in arrays.items() if bindings[n] == "input"}
        sessions = []
        for role in ("encoder", "step"):
            so = session_options(threads, profile_prefix)
            for name, value in initializers.items():
                so.add_initializer(name, value)
            path = contained(folder, manifest["graphs"][role])
            try:
                sessions.append(ort.InferenceSession(str(path), so, providers=providers))
            except Exception as err:  # onnxruntime's errors (Fail, InvalidGraph, RuntimeException, ...) share no base
                if isinstance(err, MemoryError):
                    raise
                reason = " ".join(str(err).split())  # one line: onnxruntime's messages span several
                raise BundleError(f"{folder}: onnxruntime {ort.__version__} cannot load {manifest['graphs'][role]}: "
                                  f"{reason}") from None
        for role, session in zip(("encoder", "step"), sessions):
            if session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY) != manifest["fingerprint"]:
                raise BundleError(f"{folder}: {manifest['graphs'][role]} does not carry the manifest's fingerprint: "
                                  "the graphs and the weights come from different exports; copy the whole bundle "
                                  "folder, not single files")
        encoder, step = sessions
        if device == "cuda" and "CUDAExecutionProvider" not in step.get_providers():
            raise DeviceError("onnxruntime could not start CUDA for this bundle (is a GPU visible?)")
        spec = BundleSpec.from_manifest(manifest)
        head = StrategyHead.from_shared(spec, arrays)
        output_ids = _output_ids(folder, spec, arrays.get(OUTPUT_IDS))
        index = np.full(spec.vocab_size, -1, np.int64)
        index[output_ids] = np.arange(output_ids.size)
        return cls(manifest, spec, device, encoder, step, inputs, head, output_ids, index, (arrays, initializers))

    def to_output(self, ids: np.ndarray) -> np.ndarray:
        """The logit indices of the vocabulary ids `ids` that the LM head computes (the others dropped)."""
        index = self.output_index[ids]
        return index[index >= 0]

    def encode(self, context_ids: np.ndarray) -> dict[str, ort.OrtValue]:
        """The encoder on context ids [1, S] (int64): the cross-attention K, V of every decoder
        layer by the encoder's output names, [1, N, S, H] each, on the device."""
        io = self.encoder.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(context_ids, dtype=np.int64))
        _bind_shared(io, self.encoder, self.inputs)
        names = [o.name for o in self.encoder.get_outputs()]
        for name in names:
            io.bind_output(name, self.device)
        self.encoder.run_with_iobinding(io)
        return dict(zip(names, io.get_outputs()))

    def start(self, context_ids: np.ndarray, capacity: int | None = None) -> DecodeRun:
        """Run the encoder on context ids [1, S] (int64) and return a run at decoder position 0
        that can take `capacity` steps (default: the position table's max_positions)."""
        context = np.asarray(context_ids)
        return DecodeRun(self, self.encode(context), context.shape[-1], capacity or self.spec.max_positions)

    def empty_state(self, rows: int) -> dict[str, np.ndarray]:
        """STAR's state before position 0 for `rows` sequences, by the step's input names."""
        dtype = np.dtype(self.spec.float_dtype)
        empty = {"max": np.full((rows, 1), max(EMPTY_MAX, float(np.finfo(dtype).min)), dtype),
                 "norm": np.zeros((rows, 1), dtype), "sum": np.zeros((rows, self.spec.d_model), dtype)}
        return {star_names(part)[0]: empty[part] for part in STAR_STATE}


def _output_ids(folder: Path, spec: BundleSpec, table: np.ndarray | None) -> np.ndarray:
    """The LM head's vocabulary ids (all of them without a table); BundleError for a table that is
    not increasing ids of the vocabulary with __end__ among them (the manifest checked its shape)."""
    if table is None:
        return np.arange(spec.vocab_size, dtype=np.int64)
    ids = table.astype(np.int64)
    if ids.min() < 0 or ids.max() >= spec.vocab_size or (np.diff(ids) <= 0).any() or spec.eos_id not in ids:
        raise BundleError(f"{folder}: the LM head's id table ({OUTPUT_IDS}) is not increasing ids of the "
                          "vocabulary with __end__ among them; re-export the bundle")
    return ids


def _bind_shared(io: ort.IOBinding, session: ort.InferenceSession, values: dict[str, ort.OrtValue]) -> None:
    for graph_input in session.get_inputs():
        if graph_input.name in values:
            io.bind_ortvalue_input(graph_input.name, values[graph_input.name])


class DecodeRun:
    """One sequence's decoding state: position, KV cache, STAR state, output buffers.

    The KV cache is one buffer per layer and kind, [1, N, capacity, H], allocated once and bound as
    both the past input and the present output: the step writes position t's k, v into it (spec:
    `cache_pairs`). STAR's state alternates between two sets of buffers (the step reads one and
    writes the other; its ops cannot work in place). After `step`, `logits` [V_out] and `hidden` [d]
    hold that position's results (float32, the run's own buffers: the next step overwrites them).
    """

    def __init__(self, engine: Engine, cross: dict[str, ort.OrtValue], source_length: int, capacity: int) -> None:
        spec = engine.spec
        if not 1 <= capacity <= spec.max_positions:
            raise ValueError(f"capacity must be in 1..{spec.max_positions}, not {capacity}")
        self.engine, self.position, self.capacity = engine, 0, capacity
        self._io = io = engine.step.io_binding()
        device = engine.device
        dtype = np.dtype(spec.float_dtype)
        n, hd, d = spec.decoder_heads, spec.head_dim, spec.d_model
        # The host's inputs: the binding keeps pointers to them, so they live as long as the run
        # (ids and position are written in place before every step).
        self._ids = np.zeros((1, 1), np.int64)
        self._pos = np.zeros((1,), np.int32)
        self._source = np.array([source_length], np.int32)
        for name, array in zip(STEP_INPUTS, (self._ids, self._pos, self._source)):
            io.bind_cpu_input(name, array)
        _bind_shared(io, engine.step, engine.inputs)
        for name, past in spec.cross().items():
            io.bind_ortvalue_input(past, cross[name])
        self._cross = cross  # kept alive while bound
        self._cache = []
        for past, present in spec.cache_pairs().items():
            value = ort.OrtValue.ortvalue_from_shape_and_type([1, n, capacity, hd], dtype, device, 0)
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
            self._cache.append(value)
        self._logits = np.empty((1, spec.output_size), np.float32)
        self._hidden = np.empty((1, d), np.float32)
        for name, buf in zip(HOST_OUTPUTS, (self._logits, self._hidden)):
            io.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        self.logits, self.hidden = self._logits[0], self._hidden[0]
        empty = engine.empty_state(1)
        self._state = [{name: ort.OrtValue.ortvalue_from_numpy(a, device) for name, a in empty.items()}
                       for _ in range(2)]  # [read by the next step, written by it]
        self._outputs = {past: present for present, past in spec.recurrent().items()}

    def step(self, token_id: int) -> np.ndarray:
        """Feed one token at the current position; returns `logits` (h' through the LM head)."""
        if self.position >= self.capacity:
            raise ValueError(f"the run holds {self.capacity} positions and all are used")
        io = self._io
        self._ids[0, 0] = token_id
        self._pos[0] = self.position
        current, following = self._state
        for past, present in self._outputs.items():
            io.bind_ortvalue_input(past, current[past])
            io.bind_ortvalue_output(present, following[past])
        self.engine.step.run_with_iobinding(io)
        self._state.reverse()
        self.position += 1
        return self.logits

    def close(self) -> None:
        """The end of the sequence (a run of its own holds nothing to give back)."""
