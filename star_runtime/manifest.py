"""The manifest schema: what `manifest.json` holds, checked field by field on load.

One schema for the exporter, which writes it, and the runtime, which validates it before it uses
any value (docs/bundle.md lists every field). Format version 4, and 3, which it reads too:

    format_version     4 (an integer; version 3 stored a float embedding transposed even when the
                       LM head was trimmed, so a version-3 reader cannot load a float trimmed
                       bundle of version 4; version 1 bundles had no fingerprint and no
                       self-check, version 2 decoded one sequence per step and copied its KV cache
                       at every token)
    producer           "star-export"
    precision          "float32" | "int8" | "float16";  devices: the devices it runs on
    graphs             {"encoder", "step", "weights"}: names of files listed in `files`
    fingerprint        64 hex digits, also in weights.bin's header and in both graphs' metadata
    shared_tensors     name -> {dtype, shape, offset, length, binding}: arrays read from weights.bin
    io                 float_dtype, d_model, decoder_layers, decoder_heads, head_dim, vocab_size,
                       max_positions (the step graph's state sizes), output_size (the LM head's
                       rows: vocab_size, or fewer with the shared tensor lm.ids, the vocabulary id
                       of each logit, binding "host")
    model_config       the architecture, shown to users (model_type, sizes, star)
    strategies         labels, tokens, token_ids, logit_bias: 8 each
    special_ids        pad, bos, eos, unk
    generation         do_sample, top_p, top_k, temperature, repetition_penalty, max_new_tokens,
                       max_source_length (the defaults of every reply)
    validation         the exporter's comparison with PyTorch (numbers, for people), or null
    selfcheck          the golden outputs (star_runtime.selfcheck)
    files              name -> {sha256, size}: every file of the folder but the manifest

`validate` raises BundleError with one line naming the field (`generation.temperature`) and what
is wrong; cross-field rules (ids inside the vocabulary, tensors inside weights.bin, lengths inside
the position table) are checked too, so nothing later indexes out of range.
"""

from __future__ import annotations

import math
import re
from typing import Any

from star_runtime.json_bytes import JSONBytesError, decode_json
from star_runtime.spec import OUTPUT_IDS

FORMAT_VERSION = 4  # what star-export writes
OLDEST_FORMAT_VERSION = 3  # the oldest this star_runtime reads
PRECISIONS = {"float32": ("cpu", "cuda"), "int8": ("cpu",), "float16": ("cuda",)}
DTYPES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}  # itemsize, bytes
BINDINGS = ("input", "initializer", "host")  # a graph input, an initializer of both graphs, or the host's
N_STRATEGIES = 8
MAX_MANIFEST_BYTES = 1 << 20  # the int8 default's manifest is 14 KB; nothing legitimate is near 1 MiB
MAX_FILE_BYTES = 1 << 36  # 64 GiB: any real bundle (the 90M float32 one is 357 MB) fits
MAX_DIM = 1 << 24  # vocabulary, widths, positions: BlenderBot-Small's largest is 54,952
MAX_LAYERS = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class BundleError(ValueError):
    """A bundle that cannot be used: the message names the folder and the problem."""


def parse(data: bytes, source: str) -> dict[str, Any]:
    """The manifest's bytes -> a dict; BundleError for bytes that are not one JSON object
    (star_runtime.json_bytes: NaN, Infinity and too deep a nesting are refused too)."""
    try:
        value = decode_json(data, source)
    except JSONBytesError as err:
        raise BundleError(str(err)) from None
    if not isinstance(value, dict):
        raise BundleError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


class _Fields:
    """Typed reads of a nested dict; every failure is one BundleError naming the dotted key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> None:
        raise BundleError(f"{self.source}: {key}: {problem}")

    def get(self, obj: dict | list, key: str | int, path: str) -> Any:
        """obj[key]; a list's entries are read by index (always present: callers iterate the list)."""
        if isinstance(obj, dict) and key not in obj:
            self.fail(path, "missing")
        return obj[key]

    def object(self, obj: dict, key: str, path: str) -> dict:
        value = self.get(obj, key, path)
        if not isinstance(value, dict):
            self.fail(path, f"expected an object, got {_kind(value)}")
        return value

    def integer(self, obj: dict, key: str, path: str, lo: int = 0, hi: int = MAX_DIM) -> int:
        value = self.get(obj, key, path)
        if type(value) is not int:  # bool is an int subclass: `true` is not a version or a size
            self.fail(path, f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            self.fail(path, f"{value} is outside {lo}..{hi}")
        return value

    def number(self, obj: dict, key: str, path: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
        value = self.get(obj, key, path)
        if type(value) not in (int, float) or not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {_kind(value)}")
        if value < lo or value > hi or (open_lo and value == lo):
            self.fail(path, f"{value} is outside {'(' if open_lo else '['}{lo}, {hi}]")
        return float(value)

    def boolean(self, obj: dict, key: str, path: str) -> bool:
        value = self.get(obj, key, path)
        if type(value) is not bool:
            self.fail(path, f"expected true or false, got {_kind(value)}")
        return value

    def string(self, obj: dict, key: str, path: str, choices: tuple[str, ...] | None = None) -> str:
        value = self.get(obj, key, path)
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_kind(value)}")
        if choices is not None and value not in choices:
            self.fail(path, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def items(self, obj: dict, key: str, path: str, n: int | None = None, n_min: int = 1,
              n_max: int = MAX_DIM) -> list:
        """A list of `n` entries, or of n_min..n_max."""
        value = self.get(obj, key, path)
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
        if n is not None and len(value) != n:
            self.fail(path, f"expected {n} entries, got {len(value)}")
        if not n_min <= len(value) <= n_max:
            self.fail(path, f"expected {n_min}..{n_max} entries, got {len(value)}")
        return value

    def integers(self, obj: dict, key: str, path: str, lo: int, hi: int, **length: int) -> list[int]:
        """A list of integers in lo..hi; `length`: items' n, n_min, n_max."""
        values = self.items(obj, key, path, **length)
        for i, value in enumerate(values):
            self.integer(values, i, f"{path}[{i}]", lo, hi)
        return values

    def numbers(self, obj: dict, key: str, path: str, **length: int) -> list[float]:
        values = self.items(obj, key, path, **length)
        for i in range(len(values)):
            self.number(values, i, f"{path}[{i}]", -1e30, 1e30)
        return values

    def strings(self, obj: dict, key: str, path: str, **length: int) -> list[str]:
        values = self.items(obj, key, path, **length)
        for i in range(len(values)):
            self.string(values, i, f"{path}[{i}]")
        return values


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def check_version(manifest: dict[str, Any], source: str, folder: str) -> None:
    """The format version first: a newer or older bundle gets advice, not a list of field errors."""
    f = _Fields(source)
    version = f.integer(manifest, "format_version", "format_version", 0, 1 << 30)
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format version {version} is newer than this star_runtime reads "
            f"({FORMAT_VERSION}); upgrade star_runtime or re-export with a matching star-export")
    if version < OLDEST_FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format version {version} is older than this star_runtime reads "
            f"({OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}: from 3 on the decoder step batches sequences at their "
            "own positions and writes the KV cache in place); "
            "re-export it from its checkpoint with this star-export")


def validate(manifest: dict[str, Any], source: str, folder: str) -> dict[str, Any]:
    """Check every field of a parsed manifest (module docstring); returns it unchanged."""
    check_version(manifest, source, folder)
    f = _Fields(source)
    f.string(manifest, "producer", "producer")
    precision = f.string(manifest, "precision", "precision", tuple(PRECISIONS))
    devices = f.items(manifest, "devices", "devices", n_max=2)
    for i in range(len(devices)):
        f.string(devices, i, f"devices[{i}]", PRECISIONS[precision])
    fingerprint = f.string(manifest, "fingerprint", "fingerprint")
    if not _HEX64.fullmatch(fingerprint):
        f.fail("fingerprint", "expected 64 lowercase hex digits")

    files = f.object(manifest, "files", "files")
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name) or name == "manifest.json":
            f.fail(f"files.{name}", "not a plain file name inside the bundle folder")
        if not isinstance(entry, dict):
            f.fail(f"files.{name}", f"expected an object, got {_kind(entry)}")
        if not _HEX64.fullmatch(f.string(entry, "sha256", f"files.{name}.sha256")):
            f.fail(f"files.{name}.sha256", "expected 64 lowercase hex digits")
        f.integer(entry, "size", f"files.{name}.size", 0, MAX_FILE_BYTES)

    graphs = f.object(manifest, "graphs", "graphs")
    for role in ("encoder", "step", "weights"):
        if f.string(graphs, role, f"graphs.{role}") not in files:
            f.fail(f"graphs.{role}", f"{graphs[role]!r} is not one of the bundle's files")

    io = f.object(manifest, "io", "io")
    f.string(io, "float_dtype", "io.float_dtype", ("float32", "float16"))
    d = f.integer(io, "d_model", "io.d_model", 1)
    f.integer(io, "decoder_layers", "io.decoder_layers", 1, MAX_LAYERS)
    heads = f.integer(io, "decoder_heads", "io.decoder_heads", 1)
    if f.integer(io, "head_dim", "io.head_dim", 1) * heads != d:
        f.fail("io.head_dim", f"head_dim x decoder_heads must be d_model ({d})")
    vocab = f.integer(io, "vocab_size", "io.vocab_size", N_STRATEGIES + 4)
    positions = f.integer(io, "max_positions", "io.max_positions", 3)
    outputs = f.integer(io, "output_size", "io.output_size", 1, vocab)

    _shared_tensors(f, manifest, files[graphs["weights"]]["size"])
    table = manifest["shared_tensors"].get(OUTPUT_IDS)
    if outputs < vocab and (table is None or (table["dtype"], table["shape"], table["binding"]) !=
                            ("int32", [outputs], "host")):
        f.fail(f"shared_tensors.{OUTPUT_IDS}", f"an LM head of {outputs} of the {vocab} tokens needs their ids: "
               f"int32 [{outputs}], binding host")
    if outputs == vocab and table is not None:
        f.fail(f"shared_tensors.{OUTPUT_IDS}", "an LM head over the whole vocabulary has no id table")
    _model_config(f, manifest)
    ids = {"lo": 0, "hi": vocab - 1}
    strategies = f.object(manifest, "strategies", "strategies")
    f.strings(strategies, "labels", "strategies.labels", n=N_STRATEGIES)
    f.strings(strategies, "tokens", "strategies.tokens", n=N_STRATEGIES)
    token_ids = f.integers(strategies, "token_ids", "strategies.token_ids", n=N_STRATEGIES, **ids)
    if len(set(token_ids)) != N_STRATEGIES:
        f.fail("strategies.token_ids", "the 8 ids must differ")
    f.numbers(strategies, "logit_bias", "strategies.logit_bias", n=N_STRATEGIES)
    special = f.object(manifest, "special_ids", "special_ids")
    for name in ("pad", "bos", "eos", "unk"):
        f.integer(special, name, f"special_ids.{name}", **ids)

    g = f.object(manifest, "generation", "generation")
    f.boolean(g, "do_sample", "generation.do_sample")
    f.number(g, "top_p", "generation.top_p", 0.0, 1.0, open_lo=True)
    f.integer(g, "top_k", "generation.top_k", 0, vocab)
    f.number(g, "temperature", "generation.temperature", 0.0, 100.0, open_lo=True)
    f.number(g, "repetition_penalty", "generation.repetition_penalty", 0.0, 100.0, open_lo=True)
    # Decoder positions: __start__, the strategy token, then the response (the position table's size).
    f.integer(g, "max_new_tokens", "generation.max_new_tokens", 0, positions - 2)
    f.integer(g, "max_source_length", "generation.max_source_length", 1, positions)

    if manifest.get("validation") is not None:
        f.object(manifest, "validation", "validation")
    _selfcheck(f, manifest, vocab, positions)
    return manifest


def _shared_tensors(f: _Fields, manifest: dict[str, Any], weights_size: int) -> None:
    tensors = f.object(manifest, "shared_tensors", "shared_tensors")
    if not tensors:
        f.fail("shared_tensors", "empty: both graphs read the embedding from it")
    for name, spec in tensors.items():
        path = f"shared_tensors.{name}"
        if not isinstance(spec, dict):
            f.fail(path, f"expected an object, got {_kind(spec)}")
        dtype = f.string(spec, "dtype", f"{path}.dtype", tuple(DTYPES))
        shape = f.integers(spec, "shape", f"{path}.shape", 1, MAX_DIM, n_max=4)
        offset = f.integer(spec, "offset", f"{path}.offset", 0, MAX_FILE_BYTES)
        length = f.integer(spec, "length", f"{path}.length", 0, MAX_FILE_BYTES)
        f.string(spec, "binding", f"{path}.binding", BINDINGS)
        if math.prod(shape) * DTYPES[dtype] != length:
            f.fail(f"{path}.length", f"{length} bytes is not shape {shape} of {dtype}")
        if offset % DTYPES[dtype]:  # the runtime maps it as an array of dtype: elements must be aligned
            f.fail(f"{path}.offset", f"{offset} is not a multiple of {dtype}'s {DTYPES[dtype]} bytes")
        if offset + length > weights_size:
            f.fail(f"{path}.offset", f"bytes {offset}..{offset + length} lie past the end of the weights file "
                   f"({weights_size} bytes)")


def _model_config(f: _Fields, manifest: dict[str, Any]) -> None:
    cfg = f.object(manifest, "model_config", "model_config")
    f.string(cfg, "model_type", "model_config.model_type")
    for key in ("d_model", "encoder_layers", "decoder_layers", "vocab_size"):
        f.integer(cfg, key, f"model_config.{key}", 1)
    if cfg["vocab_size"] != manifest["io"]["vocab_size"] or cfg["d_model"] != manifest["io"]["d_model"]:
        f.fail("model_config", "vocab_size and d_model must be io's")
    if "star" in cfg:
        f.object(cfg, "star", "model_config.star")


def _selfcheck(f: _Fields, manifest: dict[str, Any], vocab: int, positions: int) -> None:
    """star_runtime.selfcheck's golden record: the fixed input and the exporter's outputs."""
    check = f.object(manifest, "selfcheck", "selfcheck")
    ids = {"lo": 0, "hi": vocab - 1}
    f.integers(check, "context_ids", "selfcheck.context_ids", n_max=positions, **ids)
    f.numbers(check, "strategy_logits", "selfcheck.strategy_logits", n=N_STRATEGIES)
    for key in ("onnxruntime", "provider", "machine"):
        f.string(check, key, f"selfcheck.{key}")
    steps = f.items(check, "steps", "selfcheck.steps", n_max=positions - 2)
    for i, step in enumerate(steps):
        path = f"selfcheck.steps[{i}]"
        if not isinstance(step, dict):
            f.fail(path, f"expected an object, got {_kind(step)}")
        f.integer(step, "token", f"{path}.token", **ids)
        probes = f.integers(step, "ids", f"{path}.ids", n_max=vocab, **ids)
        f.numbers(step, "logits", f"{path}.logits", n=len(probes))
