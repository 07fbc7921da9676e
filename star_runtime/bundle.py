"""A bundle on disk: its files, read only inside the folder and only as the manifest hashes them.

A bundle is the folder `star-export` writes (docs/bundle.md has the why of every choice):

    manifest.json        the schema of star_runtime.manifest: precision, graphs, fingerprint, model
                         config, strategies, generation defaults, the self-check's golden outputs,
                         and sha256 + size of every other file
    encoder.onnx         context ids -> cross-attention keys/values of every decoder layer
    decoder_step.onnx    one decoder position: self-attention KV cache, STAR state, LM head
    weights.bin          a 4 KiB header (magic + fingerprint), then every weight once, 4 KiB-aligned;
                         both graphs point into it
    vocab.json, merges.txt, added_tokens.json, ...   the tokenizer (star_runtime.tokenizer)

Containment: every name the manifest gives is a plain file name; the file it names must resolve
inside the folder (a symlink out of it is refused) and be a regular file (a FIFO or a device is
refused before it is read, so it cannot hang the load or fill memory); every read is bounded by
the size the manifest records, and every byte the runtime itself parses (manifest, tokenizer) is
hashed from the same bytes it parses. onnxruntime opens the graphs and weights.bin by path, after
they were checked, and the fingerprint ties the three together.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from star_runtime.manifest import (FORMAT_VERSION, MAX_MANIFEST_BYTES, OLDEST_FORMAT_VERSION, PRECISIONS, BundleError,
                                   parse, validate)

MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
STEP_FILE = "decoder_step.onnx"
WEIGHTS_FILE = "weights.bin"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json")  # what Tokenizer reads
ALIGNMENT = 4096  # bytes; onnxruntime memory-maps external data only at page-aligned offsets
WEIGHTS_MAGIC = b"STAR weights\n"  # weights.bin starts with it, then the fingerprint (64 hex) and "\n"
WEIGHTS_HEADER = ALIGNMENT  # the header's bytes; the first tensor starts after it
FINGERPRINT_KEY = "star_fingerprint"  # the graphs' metadata_props entry
_CHUNK = 1 << 22

__all__ = ["ALIGNMENT", "BundleError", "ENCODER_FILE", "FINGERPRINT_KEY", "FORMAT_VERSION", "MANIFEST_FILE",
           "OLDEST_FORMAT_VERSION", "PRECISIONS", "STEP_FILE", "TOKENIZER_FILES", "WEIGHTS_FILE", "WEIGHTS_HEADER",
           "contained", "file_entry", "load_manifest", "read_file", "read_shared_tensors", "sha256_file",
           "weights_fingerprint", "weights_header"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file: {"sha256": hex, "size": bytes}."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def weights_header(fingerprint: str) -> bytes:
    """The first WEIGHTS_HEADER bytes of weights.bin: magic, fingerprint, newline, zeros."""
    head = WEIGHTS_MAGIC + fingerprint.encode("ascii") + b"\n"
    return head + bytes(WEIGHTS_HEADER - len(head))


def contained(folder: Path, name: str) -> Path:
    """folder/name, resolved; BundleError unless it is a regular file inside the folder."""
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root:  # names are plain (the schema); this catches symlinks out of the folder
        raise BundleError(f"{folder}: {name} resolves outside the bundle folder; a bundle holds its own files")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BundleError(f"{folder}: missing file {name} (the manifest lists it)") from None
    except OSError as err:
        raise BundleError(f"{folder}: cannot read {name}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{folder}: {name} is not a regular file (a FIFO, a device or a folder)")
    return path


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """At most `limit` bytes of a regular file (checked on the open descriptor, so a file swapped for
    a FIFO after `contained` cannot block); BundleError if it holds more."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise BundleError(f"{what}: cannot read: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{what}: not a regular file (a FIFO, a device or a folder)")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{what}: larger than {limit} bytes")
    return data


def load_manifest(folder: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Read `folder`/manifest.json, validate it (star_runtime.manifest) and check the files it lists.

    Every listed file must be a regular file inside the folder with the recorded size; verify: also
    hash the graphs and weights. The tokenizer's files are hashed whenever they are read (`read_file`).
    """
    # Hashing is 0.1 s for the 21 MB int8 default on the 2-core CPU: cheap enough to do by default.
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not (folder / MANIFEST_FILE).exists() and not (folder / MANIFEST_FILE).is_symlink():
        raise BundleError(f"{folder}: no {MANIFEST_FILE}; not a bundle written by star-export")
    path = contained(folder, MANIFEST_FILE)
    manifest = validate(parse(_read_bounded(path, MAX_MANIFEST_BYTES, str(path)), str(path)), str(path), str(folder))
    for name, entry in manifest["files"].items():
        file = contained(folder, name)
        size = file.stat().st_size
        if size != entry["size"]:
            raise BundleError(f"{folder}: {name} holds {size} bytes, the manifest says {entry['size']}: the file "
                              "was changed")
        if verify and name not in TOKENIZER_FILES and sha256_file(file) != entry["sha256"]:
            raise BundleError(f"{folder}: {name}: sha256 differs from the manifest: the file was changed or is corrupt")
    for name in TOKENIZER_FILES:
        if name not in manifest["files"]:
            raise BundleError(f"{folder}: the manifest lists no {name}: the tokenizer would read a file no hash "
                              "covers; re-export the bundle")
    return manifest


def read_file(folder: Path, manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of a listed file, read with the manifest's size as bound and checked against its
    sha256 (the bytes returned are the bytes hashed)."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise BundleError(f"{folder}: {name} is not among the manifest's files: no hash covers it")
    data = _read_bounded(contained(folder, name), entry["size"], f"{folder}: {name}")
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{folder}: {name}: sha256 differs from the manifest: the file was changed or is corrupt")
    return data


def weights_fingerprint(folder: Path, manifest: dict[str, Any]) -> str | None:
    """The fingerprint in weights.bin's header, or None when it has no STAR header."""
    with open(contained(folder, manifest["graphs"]["weights"]), "rb") as f:  # regular: `contained` checked it
        head = f.read(len(WEIGHTS_MAGIC) + 65)
    if not head.startswith(WEIGHTS_MAGIC):
        return None
    return head[len(WEIGHTS_MAGIC):len(WEIGHTS_MAGIC) + 64].decode("ascii", errors="replace")


def read_shared_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tensors both graphs read (the token embedding), each a read-only mapping of weights.bin.

    They are handed to every session with `SessionOptions.add_initializer`, so memory holds one
    copy however many graphs use them. Mapped, not read: an int8 bundle's graphs only gather rows
    of the embedding, so only the pages of tokens a conversation uses become resident (peak RSS of
    a 90M reply 231 -> 204 MB; the whole embedding is 28 MB). The bundle's files must then not be
    changed in place while it is open (the exporter replaces a bundle by renaming a new folder
    over it, which leaves an open one intact). The schema bounds every offset and length by the
    file size.
    """
    path = contained(folder, manifest["graphs"]["weights"])
    size = path.stat().st_size
    out = {}
    for name, spec in manifest["shared_tensors"].items():
        dtype = np.dtype(spec["dtype"])
        if spec["offset"] + spec["length"] > size:
            raise BundleError(f"{folder}: {WEIGHTS_FILE} ends inside shared tensor {name}")
        data = np.memmap(path, dtype=dtype, mode="r", offset=spec["offset"], shape=spec["length"] // dtype.itemsize)
        out[name] = data.reshape(spec["shape"])  # sessions keep a pointer: the array must outlive them
    return out
