"""The bundle on disk: one manifest schema, containment, fingerprint, and the golden self-check.

Every malformed manifest, every file outside the folder or not covered by a hash, every FIFO or
device file, gets one line in a BundleError; a bundle whose numbers a platform (or an edited
weights file) does not reproduce is refused at load. Tiny preset, random weights
(tests/star_bundles.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from star_runtime import BundleError, Runtime
from star_runtime.bundle import FORMAT_VERSION, MANIFEST_FILE, OLDEST_FORMAT_VERSION, load_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def _write_manifest(folder: Path, manifest: dict | str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (folder / MANIFEST_FILE).write_text(text)


def _rehash(folder: Path, name: str) -> None:
    """Record `name`'s current sha256 and size in the manifest, as a careful forger would."""
    manifest = _manifest(folder)
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _write_manifest(folder, manifest)


def _one_line_refusal(folder: Path, match: str, **kwargs) -> str:
    with pytest.raises(BundleError) as err:
        Runtime.load(folder, **kwargs)
    message = str(err.value)
    assert "\n" not in message and match in message, message
    return message


# -- one schema, one-line errors for every malformed field ---------------------------------------

def _set(path: str, value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value
    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        del m[last]
    return edit


MALFORMED = {
    "files as a list": (lambda m: m.update(files=list(m["files"])), "files"),
    "an entry without size": (lambda m: m["files"]["vocab.json"].pop("size"), "size"),
    "graphs as a string": (_set("graphs", "encoder.onnx"), "graphs"),
    "precision as a list": (_set("precision", ["int8"]), "precision"),
    "no shared_tensors": (_drop("shared_tensors"), "shared_tensors"),
    "an unknown dtype": (lambda m: next(iter(m["shared_tensors"].values())).update(dtype="float99"), "dtype"),
    "a missing io key": (_drop("io.head_dim"), "io.head_dim"),
    "temperature 0": (_set("generation.temperature", 0), "generation.temperature"),
    "format_version true": (_set("format_version", True), "format_version"),
    "a size given as a string": (lambda m: m["files"]["vocab.json"].update(size="991656"), "size"),
    "max_source_length 0": (_set("generation.max_source_length", 0), "generation.max_source_length"),
    "a strategy id outside the vocabulary": (lambda m: m["strategies"]["token_ids"].__setitem__(0, 10**9),
                                             "strategies.token_ids"),
    "a shared tensor past the end of weights.bin": (
        lambda m: next(iter(m["shared_tensors"].values())).update(offset=2**40), "offset"),
    "a shared tensor at an offset its dtype cannot be mapped at": (
        lambda m: [t.update(offset=t["offset"] + 1) for t in m["shared_tensors"].values() if t["dtype"] != "uint8"],
        "is not a multiple of"),
    "max_new_tokens past the position table": (_set("generation.max_new_tokens", 10**6),
                                               "generation.max_new_tokens"),
    "no self-check": (_drop("selfcheck"), "selfcheck"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_field_is_one_line(copy, case):
    edit, field = MALFORMED[case]
    manifest = _manifest(copy)
    edit(manifest)
    _write_manifest(copy, manifest)
    _one_line_refusal(copy, field)


def test_deeply_nested_json_is_one_line(copy):
    _write_manifest(copy, "[" * 100_000 + "]" * 100_000)
    _one_line_refusal(copy, "manifest.json")


def test_an_older_format_version_says_to_re_export(copy):
    manifest = _manifest(copy)
    manifest["format_version"] = 1
    _write_manifest(copy, manifest)
    message = _one_line_refusal(copy, "format version 1")
    assert "re-export" in message and "star-export" in message


# -- containment: inside the folder, regular files, bounded reads, every file hashed -------------

def _load_in_subprocess(folder: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runtime.load in a child limited to 2 GB of address space and `timeout` seconds, so a hang
    or a runaway read fails the test instead of the machine."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from star_runtime import BundleError, Runtime
        try:
            Runtime.load({str(folder)!r})
        except BundleError as err:
            print(err); sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("name", [MANIFEST_FILE, "added_tokens.json"])
def test_fifo_or_device_file_is_refused_not_read(copy, kind, name):
    if name != MANIFEST_FILE:  # an unlisted tokenizer file
        manifest = _manifest(copy)
        del manifest["files"][name]
        _write_manifest(copy, manifest)
    (copy / name).unlink()
    if kind == "fifo":
        os.mkfifo(copy / name)
    else:
        (copy / name).symlink_to("/dev/zero")
    done = _load_in_subprocess(copy)
    assert done.returncode == 3, done.stdout + done.stderr
    assert name in done.stdout and done.stdout.count("\n") == 1, done.stdout


def test_unlisted_tokenizer_file_is_refused(copy):
    manifest = _manifest(copy)
    del manifest["files"]["added_tokens.json"]
    _write_manifest(copy, manifest)
    _one_line_refusal(copy, "added_tokens.json")


@pytest.mark.parametrize("name", ["../outside.onnx", "/tmp/outside.onnx", "sub/encoder.onnx"])
def test_a_file_name_outside_the_folder_is_refused(copy, tmp_path, name):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "encoder.onnx", outside)
    manifest = _manifest(copy)
    manifest["files"][name] = manifest["files"].pop("encoder.onnx")
    manifest["graphs"]["encoder"] = name
    _write_manifest(copy, manifest)
    message = _one_line_refusal(copy, "not a plain file name inside the bundle folder")
    assert str(outside.stat().st_size) not in message  # nothing about the outside file is told


def test_a_symlink_out_of_the_folder_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(copy / "encoder.onnx", outside)
    (copy / "encoder.onnx").symlink_to(outside)
    _one_line_refusal(copy, "outside the bundle folder")


# -- the fingerprint: graphs and weights of one export ------------------------------------------

def test_graphs_beside_the_weights_of_another_export_are_refused(copy, bundle_int8):
    """int8 graphs beside float32 weights (hashes recomputed, so only the fingerprint tells)."""
    for name in ("encoder.onnx", "decoder_step.onnx"):
        shutil.copy(bundle_int8 / name, copy / name)
        _rehash(copy, name)
    _one_line_refusal(copy, "fingerprint")


# -- the golden self-check ------------------------------------------------------------------------

def _alter_a_weight(folder: Path, name: str, factor: float) -> None:
    """Scale one stored tensor of weights.bin by `factor`, then record the new hash."""
    import onnx  # the test reads the graph's external-data table; the runtime never imports onnx

    step = onnx.load(str(folder / "decoder_step.onnx"), load_external_data=False)
    tensor = next(t for t in step.graph.initializer if t.name == name)
    info = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
    with open(folder / "weights.bin", "r+b") as f:
        f.seek(info["offset"])
        values = np.frombuffer(f.read(info["length"]), np.float32) * np.float32(factor)
        f.seek(info["offset"])
        f.write(values.astype(np.float32).tobytes())
    _rehash(folder, "weights.bin")


def test_weights_altered_after_export_are_refused(copy):
    """A 5% change of one LayerNorm gamma, sha256 recomputed: only the self-check can catch it;
    the refusal names the onnxruntime version, the provider, the CPU and the difference."""
    _alter_a_weight(copy, "dec.1.ln3.gamma", 1.05)
    message = _one_line_refusal(copy, "self-check")
    for part in (ort.__version__, "CPUExecutionProvider", platform.machine(), "max |logit difference|"):
        assert part in message, message
    Runtime.load(copy, verify=False)  # verify=False skips it (and the hashes)


def test_star_chat_reports_a_failed_self_check_in_one_line(copy):
    _alter_a_weight(copy, "dec.1.ln3.gamma", 1.05)
    env = {k: v for k, v in os.environ.items() if k != "STAR_BUNDLE"}
    done = subprocess.run([sys.executable, "-m", "star_runtime.chat", "--model", str(copy)], input=b"hi\n",
                          capture_output=True, timeout=120, env=env)
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"", (done.returncode, err)
    assert err.startswith("star-chat: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "self-check failed" in err and ort.__version__ in err and platform.machine() in err, err


def test_the_self_check_costs_under_5_percent_of_a_load(monkeypatch):
    """The shipped default bundle, best of 9 each. Printed: a load, the check's time inside it (it
    makes the first runs of fresh sessions, whose one-off costs fall on the first reply when there
    is no check), and the check's own cost, the same check on warm sessions: under 5% of a load."""
    from star_runtime import runtime
    from star_runtime.runtime import default_bundle
    from star_runtime.selfcheck import run_selfcheck

    spent = []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return run_selfcheck(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    monkeypatch.setattr(runtime, "run_selfcheck", timed)
    shipped = default_bundle()
    rt = Runtime.load(shipped)  # the file cache and onnxruntime's first-session costs
    loads, warm = [], []
    for _ in range(9):
        start = time.perf_counter()
        rt = Runtime.load(shipped)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_selfcheck(rt.engine, rt.manifest)
        warm.append(time.perf_counter() - start)
    load, fresh, own = min(loads), min(spent[1:]), min(warm)
    print(f"default int8 bundle: load {load * 1e3:.1f} ms (hashes and self-check included); self-check "
          f"{fresh * 1e3:.2f} ms inside it ({fresh / load:.1%}), {own * 1e3:.2f} ms on warm sessions "
          f"= {own / load:.1%} of a load")
    assert len(spent) == 10 and own < 0.05 * load


def test_the_shipped_default_bundle_passes_its_self_check():
    from star_runtime.runtime import default_bundle

    shipped = default_bundle()
    manifest = load_manifest(shipped)
    # Format 3 (the default's) is still read: a format-4 runtime differs only for float trimmed bundles.
    assert OLDEST_FORMAT_VERSION <= manifest["format_version"] <= FORMAT_VERSION and manifest["precision"] == "int8"
    Runtime.load(shipped)  # raises BundleError if this platform computes something else
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 30e6


def test_the_spec_is_the_manifests_model_sections_and_names_every_tensor(bundle):
    """BundleSpec reads back what the exporter wrote from it, and its names are the graphs' own."""
    from star_runtime.sampling import DecodingOptions
    from star_runtime.spec import HOST_OUTPUTS, STEP_INPUTS, BundleSpec

    manifest = load_manifest(bundle)
    spec = BundleSpec.from_manifest(manifest)
    for key, section in spec.as_manifest().items():
        assert manifest[key] == section, key
    assert spec.decoding == DecodingOptions()  # the paper's defaults, written once
    rt = Runtime.load(bundle)
    step_inputs = {i.name for i in rt.engine.step.get_inputs()}
    step_outputs = [o.name for o in rt.engine.step.get_outputs()]
    encoder_outputs = {o.name for o in rt.engine.encoder.get_outputs()}
    assert tuple(step_outputs[:len(HOST_OUTPUTS)]) == HOST_OUTPUTS
    assert set(spec.recurrent()) | set(spec.cache_pairs().values()) == set(step_outputs[len(HOST_OUTPUTS):])
    assert set(spec.cross()) == encoder_outputs
    fed = set(spec.recurrent().values()) | set(spec.cross().values()) | set(spec.cache_pairs())
    assert step_inputs == fed | set(STEP_INPUTS) | (set(manifest["shared_tensors"]) & step_inputs)
