"""The runtime's public API refuses what it cannot honour, with one clear error each.

A bundle whose weights are NaN, generation past the position table, NaN sampling options,
negative thread counts, a bool as a strategy id; plus what the package exports (version, the
default bundle, SafetyPolicy, a documented Runtime). Tiny random bundle (tests/star_bundles.py).
"""

from __future__ import annotations

import json
import pydoc
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import star_runtime
from star_runtime import BundleError, Runtime
from star_runtime.sampling import DecodingOptions

STAR_CHAT = [sys.executable, "-m", "star_runtime.chat"]


@pytest.fixture(scope="module")
def nan_bundle(bundle, tmp_path_factory) -> Path:
    """The tiny bundle with every weight NaN (float32 NaN in every 4 bytes of weights.bin after its
    header, which keeps the fingerprint) and the manifest's sha256 of weights.bin updated, as an
    export that skipped validation would write. The self-check refuses it at load; with
    verify=False it reaches the decoding loop."""
    from star_runtime.bundle import WEIGHTS_HEADER, sha256_file

    out = tmp_path_factory.mktemp("nan") / "bundle"
    shutil.copytree(bundle, out)
    weights = out / "weights.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[:WEIGHTS_HEADER]
                        + np.full((len(data) - WEIGHTS_HEADER) // 4, np.nan, np.float32).tobytes())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["weights.bin"]["sha256"] = sha256_file(weights)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# -- NaN at run time ----------------------------------------------------------------------------
@pytest.mark.parametrize("do_sample", [True, False])
def test_nan_weights_give_one_clear_error(nan_bundle, do_sample) -> None:
    from star_runtime import NonFiniteOutputError

    with pytest.raises(BundleError, match="self-check"):
        Runtime.load(nan_bundle, threads=1)  # refused at load, before anyone talks to it
    rt = Runtime.load(nan_bundle, threads=1, verify=False)
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite") as err:
        rt.conversation(seed=0, do_sample=do_sample).reply("I feel alone.")
    assert isinstance(err.value, RuntimeError) and "\n" not in str(err.value)
    with pytest.raises(NonFiniteOutputError):
        rt.generate([5, 6, 7], do_sample=do_sample, seed=0)


def test_star_chat_refuses_a_nan_bundle_and_pipe_mode_never_prints_nan(nan_bundle) -> None:
    import io
    from types import SimpleNamespace

    from star_runtime.chat import run_pipe

    done = subprocess.run(STAR_CHAT + ["--model", str(nan_bundle), "--greedy"], input=b"hello\n",
                          capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"" and "self-check" in err and err.count("\n") == 1, err
    # Past the check (verify=False), the pipe loop still answers each line with an error, not NaN.
    rt = Runtime.load(nan_bundle, threads=1, verify=False)
    out = io.StringIO()
    run_pipe(rt, SimpleNamespace(situation=None, seed=0, greedy=True), io.StringIO("hello\nagain\n"), out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:  # strict JSON (no NaN literal) and an error naming the problem
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert "NaN" in record["error"]


# -- API arguments ------------------------------------------------------------------------------
def test_generate_past_the_position_table_is_a_clear_value_error(rt) -> None:
    limit = rt.manifest["io"]["max_positions"] - 1
    with pytest.raises(ValueError, match=f"<= {limit}"):
        rt.generate([5, 6, 7], max_new_tokens=limit + 1)
    assert len(rt.generate([5, 6, 7], max_new_tokens=limit, stop_at_eos=False).tokens) == limit
    with pytest.raises(ValueError, match=f"<= {limit}"):
        rt.conversation(max_new_tokens=512).reply("hello")


@pytest.mark.parametrize("option", [{"temperature": float("nan")}, {"temperature": float("inf")},
                                    {"top_p": float("nan")}, {"repetition_penalty": float("nan")},
                                    {"top_k": 2.5}, {"top_k": True}, {"do_sample": "yes"},
                                    {"max_new_tokens": 2.5}, {"max_new_tokens": -1}])
def test_non_finite_or_mistyped_sampling_options_are_refused(rt, option) -> None:
    with pytest.raises(ValueError, match=next(iter(option))):
        DecodingOptions(**option)
    with pytest.raises(ValueError):
        rt.generate([5, 6, 7], **option)
    with pytest.raises(ValueError):
        rt.conversation(**option)
    with pytest.raises(ValueError, match="no decoding option named top_n"):
        rt.conversation(top_n=3)


@pytest.mark.parametrize("threads", [-1, 0, 1.5, True])
def test_bad_thread_counts_are_refused(bundle, threads) -> None:
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Runtime.load(bundle, threads=threads)


@pytest.mark.parametrize("forced", [True, False, np.True_, 1.0, -1, 8])
def test_forced_strategy_must_be_a_class_id(rt, forced) -> None:
    with pytest.raises(ValueError, match="forced_strategy must be a class id"):
        rt.generate([5, 6, 7], forced_strategy=forced)
    assert rt.generate([5, 6, 7], forced_strategy=np.int64(3), max_new_tokens=1).strategy_id == 3


def test_an_empty_path_is_refused_not_read_as_the_default(bundle) -> None:
    with pytest.raises(BundleError, match="empty"):
        Runtime.load("")


# -- what the package offers -------------------------------------------------------------------
def test_load_without_a_path_opens_the_shipped_default(monkeypatch) -> None:
    monkeypatch.delenv("STAR_BUNDLE", raising=False)
    rt = Runtime.load(threads=1)
    assert rt.path == star_runtime.default_bundle() and rt.path.name == "default_bundle"
    assert rt.conversation(seed=0).reply("I lost my job and I can't sleep.").text


def test_star_bundle_environment_names_the_default(bundle, monkeypatch) -> None:
    monkeypatch.setenv("STAR_BUNDLE", str(bundle))
    assert Runtime.load(threads=1).path == bundle


def test_no_default_anywhere_says_how_to_get_one(monkeypatch) -> None:
    from star_runtime import runtime

    monkeypatch.delenv("STAR_BUNDLE", raising=False)
    monkeypatch.setattr(runtime, "PACKAGED_BUNDLE", ("data", "no-such-bundle"))
    with pytest.raises(BundleError, match="star-export") as err:
        Runtime.load()
    assert "star-esc[train]" in str(err.value)


def test_package_exports_version_safety_policy_and_a_documented_runtime() -> None:
    from importlib import metadata

    assert star_runtime.__version__ == metadata.version("star-esc")
    assert star_runtime.SafetyPolicy.load().check_user("I want to kill myself").escalate
    text = pydoc.render_doc(star_runtime.Runtime, renderer=pydoc.plaintext)
    assert "Runtime.load" in text.split("Methods defined here")[0]  # the class's own docstring comes first
