"""The results pipeline end to end on a slice of the real ESConv data (docs/results.md, small).

size sweep -> star-train stage 0 (dialogue pretraining on chitchat and the slice's train split,
docs/pretraining.md) -> stage 1 from it, beside stage 1 (Joint) from random weights -> stage 2
(+ STAR) and the Joint control (stage 1 again from Joint) -> star-eval all four -> star-analyze Joint and STAR -> star-export float32 and int8
-> star_export.quality -> star-chat on the int8 bundle.
The same commands as docs/results.md, with the tiny preset and a few conversations, so the
pipeline is checked where the real run is an hour per stage. The slice is written to tmp (the
data are licensed and stay in ../shared).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from star_export.cli import main as export_main
from star_export.quality import main as quality_main
from star_training.analyze_cli import main as analyze_main
from star_training.eval_cli import main as eval_main
from star_training.size_sweep import main as sweep_main
from star_training.train_cli import main as train_main

SLICE = {"train": 8, "valid": 3, "test": 3}  # conversations per split: ~80 / ~25 / ~25 examples


def write_slice(esconv_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for split, n in SLICE.items():
        lines = (esconv_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.mark.slow
def test_issue_8_commands_run_end_to_end_on_a_slice_of_esconv(esconv_dir, tokenizer_dir, tmp_path) -> None:
    data = write_slice(esconv_dir, tmp_path / "esconv")
    common = ["--data", str(data), "--seed", "42"]
    train = [*common, "--tokenizer", str(tokenizer_dir), "--epochs", "4", "--lr", "1e-3", "--batch-size", "8",
             "--global-batch", "8", "--warmup-steps", "5", "--log-every", "1000"]
    runs = tmp_path / "runs"

    assert sweep_main([*common, "--candidates", "d128-L4-ffn512", "--seconds", "1", "--valid-examples", "8",
                       "--batch-size", "8", "--out", str(runs / "sweep")]) == 0
    sweep = json.loads((runs / "sweep" / "sweep.json").read_text())["results"]["d128-L4-ffn512"]
    assert sweep["steps"] >= 1 and sweep["ppl"] > 1

    pytest.importorskip("chitchat_dataset")
    assert train_main(["--stage", "0", "--preset", "tiny", "--corpus", "chitchat", "--corpus", "esconv-train",
                       "--length-buckets", "--max-steps", "3", *train, "--out", str(runs / "pretrain")]) == 0
    start = next(json.loads(line) for line in (runs / "pretrain" / "log.jsonl").read_text().splitlines())
    assert start["config"]["corpora"] == ["chitchat", "esconv-train"] and start["total_steps"] > 4 * 15_000
    assert train_main(["--stage", "1", "--init", str(runs / "pretrain" / "last"), *train,
                       "--out", str(runs / "joint-pretrained")]) == 0

    assert train_main(["--stage", "1", "--preset", "tiny", *train, "--out", str(runs / "joint")]) == 0
    assert train_main(["--stage", "2", "--init", str(runs / "joint" / "best"), *train, "--out", str(runs / "star")]) == 0
    # the Joint control: stage 1 again from Joint, for the steps stage 2 was given
    assert train_main(["--stage", "1", "--init", str(runs / "joint" / "last"), *train, "--max-steps", "4",
                       "--out", str(runs / "joint-control")]) == 0
    for run in ("joint", "star"):
        records = [json.loads(line) for line in (runs / run / "log.jsonl").read_text().splitlines()]
        assert sum(r["kind"] == "valid" for r in records) == 4
        assert (runs / run / "curves.png").stat().st_size > 0

    for run, model in (("joint", "best"), ("joint-pretrained", "best"), ("star", "best"),
                       ("joint-control", "last")):  # the control stops mid epoch 1
        out = runs / f"eval-{run}"
        assert eval_main([str(runs / run / model), *common, "--split", "test", "--limit", "8",
                          "--out", str(out)]) == 0
        scores = json.loads((out / "scores.json").read_text())
        assert scores["examples"] == 8 and scores["teacher_forced"]["ppl"] > 1
        assert "B-2" in (out / "scores.md").read_text()

    analysis = runs / "analysis"
    assert analyze_main(["--checkpoint", str(runs / "joint" / "best"), "--checkpoint", str(runs / "star" / "best"),
                         *common, "--split", "valid", "--batches", "2", "--batch-size", "4", "--max-points", "16",
                         "--out", str(analysis)]) == 0
    report = json.loads((analysis / "analysis.json").read_text())
    assert len(report["models"]) == 2 and (analysis / "clusters.png").stat().st_size > 0

    bundles = {p: runs / f"star-{p}" for p in ("float32", "int8")}
    assert export_main(["--checkpoint", str(runs / "star" / "best"), "--out", str(bundles["float32"])]) == 0
    assert export_main(["--checkpoint", str(runs / "star" / "best"), "--out", str(bundles["int8"]),
                        "--quantize", "int8"]) == 0
    quality = runs / "quality"
    assert quality_main(["--bundle", str(bundles["float32"]), "--bundle", str(bundles["int8"]), *common,
                         "--split", "test", "--limit", "4", "--max-new-tokens", "8", "--out", str(quality)]) == 0
    rows = json.loads((quality / "quality.json").read_text())["bundles"]
    assert [r["precision"] for r in rows] == ["float32", "int8"]
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"]

    chat = subprocess.run([sys.executable, "-m", "star_runtime.chat", "--model", str(bundles["int8"]), "--greedy"],
                          input="I lost my job and I feel awful.\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert "reply" in json.loads(chat.stdout)
