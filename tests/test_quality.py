"""star_export.quality: float32 and int8 bundles scored on a few fixture examples and compared.

Tiny preset, random weights, exported once per session into tmp (tests/star_bundles.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esconv_fixture import write_esconv
from star_bundles import tiny_bundle
from star_export.quality import SCORES, main

LIMIT = 4


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    return tiny_bundle(tmp_path_factory, tokenizer_dir, "float32"), tiny_bundle(tmp_path_factory, tokenizer_dir, "int8")


def test_float32_and_int8_scored_and_compared(bundles, tmp_path, capsys):
    fp32, int8 = bundles
    data, out = write_esconv(tmp_path / "esconv", n=2), tmp_path / "quality"
    rc = main(["--bundle", str(fp32), "--bundle", str(fp32), "--bundle", str(int8), "--data", str(data),
               "--limit", str(LIMIT), "--max-new-tokens", "6", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["settings"]["examples"] == LIMIT
    ref, same, quant = report["bundles"]
    assert [r["precision"] for r in report["bundles"]] == ["float32", "float32", "int8"]
    for row in (ref, same):  # the reference against itself, and a second greedy run of it
        assert row["vs_reference"]["strategy_agreement"] == 100.0
        assert row["vs_reference"]["same_reply"] == 100.0
        assert all(row["vs_reference"]["deltas"][k] == 0.0 for k in SCORES)
    assert 0.0 <= quant["vs_reference"]["strategy_agreement"] <= 100.0
    assert quant["vs_reference"]["deltas"]["bleu_2"] == pytest.approx(quant["scores"]["bleu_2"] - ref["scores"]["bleu_2"])
    assert quant["size_bytes"] < ref["size_bytes"]
    assert all(0.0 <= quant["scores"][k] <= 100.0 for k in SCORES)
    table = (out / "quality.md").read_text()
    assert len(table.strip().splitlines()) == 2 + 3 and "int8" in table
    assert table in capsys.readouterr().out


def test_not_a_bundle_is_one_line_error(bundles, tmp_path, capsys):
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    rc = main(["--bundle", str(bundles[0]), "--bundle", str(not_bundle), "--data", str(write_esconv(tmp_path / "d")),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and "manifest.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was decoded or written
