"""A bundle on disk: the manifest, its checks, and the shared weights it names.

A bundle is the folder `star-export` writes (docs/bundle.md has the why of every choice):

    manifest.json        format version, precision, devices, model config, strategy labels and
                         ids, special ids, generation defaults, graph I/O names, the shared
                         tensors' places in weights.bin, and sha256 + size of every other file
    encoder.onnx         context ids -> cross-attention keys/values of every decoder layer
    decoder_step.onnx    one decoder position: self-attention KV cache, STAR state, LM head
    weights.bin          every weight once, 4 KiB-aligned; both graphs point into it
    vocab.json, merges.txt, added_tokens.json, ...   the tokenizer (star_runtime.tokenizer)

`load_manifest` refuses a bundle with a clear `BundleError` (a ValueError) naming the problem: no
manifest, a newer format version, a file missing, a size or a sha256 that differs (a changed byte).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
STEP_FILE = "decoder_step.onnx"
WEIGHTS_FILE = "weights.bin"
ALIGNMENT = 4096  # bytes; onnxruntime memory-maps external data only at page-aligned offsets
PRECISIONS = {"float32": ("cpu", "cuda"), "int8": ("cpu",), "float16": ("cuda",)}
_CHUNK = 1 << 22


class BundleError(ValueError):
    """A bundle that cannot be used: the message names the folder and the problem."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file: {"sha256": hex, "size": bytes}."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def load_manifest(folder: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Read `folder`/manifest.json and check the bundle against it.

    verify: also hash every file (about 0.4 s for a 350 MB float32 bundle on the 2-core dev
    machine); sizes and presence are always checked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {MANIFEST_FILE}; not a bundle written by star-export") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: format_version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format version {version} is newer than this star_runtime reads "
            f"({FORMAT_VERSION}); upgrade star_runtime or re-export with a matching star-export"
        )
    if version < FORMAT_VERSION:
        raise BundleError(f"{folder}: bundle format version {version} is older than {FORMAT_VERSION}; re-export it")
    missing_keys = [k for k in ("files", "precision", "graphs", "io", "model_config", "strategies", "special_ids",
                                "generation") if k not in manifest]
    if missing_keys:
        raise BundleError(f"{path}: missing keys {missing_keys}")
    if manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{path}: unknown precision {manifest['precision']!r}")
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{folder}: missing file {name} (the manifest lists it)")
        size = file.stat().st_size
        if size != entry["size"]:
            raise BundleError(f"{file}: {size} bytes, the manifest says {entry['size']}: the file was changed")
        if verify and sha256_file(file) != entry["sha256"]:
            raise BundleError(f"{file}: sha256 differs from the manifest: the file was changed or is corrupt")
    for role in ("encoder", "step", "weights"):
        if manifest["graphs"].get(role) not in manifest["files"]:
            raise BundleError(f"{path}: graphs.{role} names no file of the bundle")
    return manifest


def read_shared_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tensors both graphs read (the token embedding), each read once from weights.bin.

    They are handed to every session with `SessionOptions.add_initializer`, so memory holds one
    copy however many graphs use them.
    """
    out = {}
    with open(folder / manifest["graphs"]["weights"], "rb") as f:
        for name, spec in manifest["shared_tensors"].items():
            dtype = np.dtype(spec["dtype"])
            f.seek(spec["offset"])
            data = np.fromfile(f, dtype=dtype, count=spec["length"] // dtype.itemsize)
            out[name] = data.reshape(spec["shape"])  # sessions keep a pointer: the array must outlive them
    return out
