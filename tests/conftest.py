"""Shared fixtures: where the licensed data lives, seeds, tiny temp folders.

The ESConv files and the BlenderBot-Small tokenizer are licensed data the project must not copy:
they are read from ../shared/data beside the checkout (or $STAR_SHARED_DATA). Tests that need
them skip with a reason where they are absent; CI always has them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from star_bundles import tiny_bundle

from star_runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STAR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    path = SHARED_DATA / "blenderbot_small-90M"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"BlenderBot-Small tokenizer files not found at {path}")
    return path


@pytest.fixture(scope="session")
def esconv_dir() -> Path:
    path = SHARED_DATA / "esconv"
    if not (path / "train.txt").is_file():
        pytest.skip(f"ESConv split files not found at {path}")
    return path


# The tiny bundles (tests/star_bundles.py: exported once per session) and a runtime on one, for
# every test module that talks to a bundle.
@pytest.fixture(scope="session")
def bundle(tmp_path_factory, tokenizer_dir) -> Path:
    return tiny_bundle(tmp_path_factory, tokenizer_dir, "float32")


@pytest.fixture(scope="session")
def bundle_int8(tmp_path_factory, tokenizer_dir) -> Path:
    return tiny_bundle(tmp_path_factory, tokenizer_dir, "int8")


@pytest.fixture(scope="module")
def rt(bundle) -> Runtime:
    return Runtime.load(bundle, threads=1)


# The trained default bundle installed with the package (not $STAR_BUNDLE): its replies are
# English, so a reply's text encodes back to its tokens, which the tiny bundle's random words
# do not always do. Needs no torch and no shared data.
@pytest.fixture(scope="session")
def shipped_bundle() -> Path:
    return REPO / "star_runtime" / "data" / "default_bundle"


@pytest.fixture(scope="module")
def shipped_rt(shipped_bundle) -> Runtime:
    return Runtime.load(shipped_bundle, threads=1)
