"""The shipped default bundle on other platforms: the oldest and the newest onnxruntime this package
accepts, each in its own venv, and linux/aarch64 under qemu (benchmarks/platforms.py, arm64.py).

Both need the package index (and the arm64 one Debian's archive), which CI has. They are in the
default suite because they fit its budget: measured on the 2-core dev machine from an empty
cache, two venvs 24 s and the arm64 environment 32 s (about 135 MB downloaded) plus 8 s of
emulation; with the cache under ~/.cache, 5 s and 9 s.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from star_runtime import Runtime
from star_runtime.runtime import default_bundle

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import arm64  # noqa: E402
import platforms  # noqa: E402


@pytest.fixture(scope="module")
def here() -> dict:
    """This process's greedy reply to platforms.MESSAGE with the shipped bundle (x86_64 here)."""
    rt = Runtime.load(default_bundle())
    reply = rt.conversation(seed=0, do_sample=False).reply(platforms.MESSAGE)
    return {"strategy": reply.strategy, "tokens": list(reply.tokens), "probs": list(reply.strategy_probs.values())}


def test_oldest_and_newest_onnxruntime_pass_the_self_check_and_reply_alike(here):
    oldest, newest = platforms.declared_minimum(), platforms.index_versions()[-1]
    start = time.perf_counter()
    records = [platforms.run_release(v, default_bundle()) for v in (oldest, newest)]
    for r in records:
        print(f"onnxruntime {r['onnxruntime']} (numpy {r.get('numpy')}): {r['status']}, self-check max |Δlogit| "
              f"{r.get('max_diff')}, reply {r.get('text')!r}")
    print(f"{time.perf_counter() - start:.1f} s with the venvs under {platforms.CACHE}")
    for r in records:
        assert r["status"] == "pass", r
        assert (r["strategy"], r["tokens"]) == (here["strategy"], here["tokens"])


@pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("dpkg-deb")),
                    reason="builds the arm64 sysroot from Debian packages: needs apt-get and dpkg-deb")
def test_arm64_under_qemu_passes_the_self_check_and_replies_as_x86(here):
    r = arm64.run_emulated(default_bundle(), platforms.CHILD, [str(default_bundle()), platforms.MESSAGE])
    assert r.get("machine") == "aarch64", r
    gap = float(np.max(np.abs(np.asarray(r["strategy_probs"]) - np.asarray(here["probs"]))))
    print(f"aarch64 (qemu, neoverse-n1), onnxruntime {r['onnxruntime']}: {r['status']}, self-check max |Δlogit| "
          f"{r['max_diff']:.1e}; setup {r['setup_s']:.1f} s, emulated run {r['wall_s']:.1f} s (load "
          f"{r['load_ms']:.0f} ms, reply {r['reply_ms']:.0f} ms); largest strategy-probability difference from "
          f"x86 {gap:.1e}")
    assert r["status"] == "pass", r
    assert (r["strategy"], r["tokens"]) == (here["strategy"], here["tokens"])
