"""Tiny STAR checkpoints and their bundles, built once per test session (tests of export and runtime).

The checkpoint is the "tiny" preset with random weights and the real tokenizer; its gate bias is
0 (g = 0.5) instead of -3, so STAR moves the logits enough for parity tests to see a mistake in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_CACHE: dict[str, Path] = {}


def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    if "ckpt" not in _CACHE:
        import torch

        from star_runtime.tokenizer import Tokenizer
        from star_training.checkpoint import load_model, save_model
        from star_training.config import StarConfig

        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        torch.manual_seed(0)
        model = load_model(
            preset="tiny", star_config=StarConfig(strategy_token_ids=tokenizer.strategy_ids),
            vocab_size=tokenizer.vocab_size)
        with torch.no_grad():
            model.star.gate_fc2.bias.zero_()
        path = tmp_path_factory.mktemp("tiny") / "ckpt"
        save_model(model, path, tokenizer_dir=tokenizer_dir)
        _CACHE["ckpt"] = path
    return _CACHE["ckpt"]


def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, precision: str = "float32") -> Path:
    if precision not in _CACHE:
        from star_export.exporter import export_bundle

        ckpt = tiny_checkpoint(tmp_path_factory, tokenizer_dir)
        out = ckpt.parent / f"bundle-{precision}"
        export_bundle(ckpt, out, precision=precision, log=lambda line: None)
        _CACHE[precision] = out
    return _CACHE[precision]
