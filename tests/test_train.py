"""star-train on the tiny preset and a project-written ESConv fixture (18 training examples:
6 conversations x 3 supporter turns). A micro-batch of 4 and a global batch of 8 make 3
optimizer steps per epoch (8 + 8 + 2 examples)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esconv_fixture import write_esconv
from star_training import train_cli
from star_training.progress import TrainingDisplay, read_jsonl
from star_training.run_state import load_trainer_state
from star_training.schedules import lr_factor
from star_training.trainer import lambda_for_epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_esconv(tmp_path_factory.mktemp("esconv"))


def tiny(data: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out),
            "--batch-size", "4", "--global-batch", "8", "--warmup-steps", "0", "--seed", "3", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def train_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "log.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def stage1_run(data_dir, tokenizer_dir, tmp_path_factory) -> Path:
    """BlenderBot-Joint (stage 1): 4 epochs, 12 steps, at a learning rate a tiny model learns at."""
    out = tmp_path_factory.mktemp("stage1")
    argv = ["--stage", "1", *tiny(data_dir, out, tokenizer_dir, "--epochs", "4", "--lr", "1e-2")]
    assert train_cli.main(argv) == 0
    return out


# -- schedules ----------------------------------------------------------------------------------
def test_learning_rate_warms_up_then_decays_linearly() -> None:
    # warm-up 4 of 10 steps: 1/4 .. 4/4, then (10 - s + 1) / 6 down to 1/6 at the last step.
    assert [lr_factor(s, 4, 10) for s in range(1, 11)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_factor(1, 0, 3) == 1.0  # no warm-up


def test_lambda_per_epoch() -> None:
    assert lambda_for_epoch(1, 10, 0.8) == pytest.approx(0.8 * math.log(2) / math.log(10))
    assert lambda_for_epoch(1, 1, 0.8) == 0.8  # one epoch: log(E_max) = 0, lambda0 itself


# -- training -----------------------------------------------------------------------------------
def test_tiny_model_trains_and_its_loss_falls(stage1_run: Path, capsys) -> None:
    records = read_jsonl(stage1_run / "log.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["epoch"] for r in valid] == [1, 2, 3, 4]
    # Measured: train L_LM 10.92 -> 8.03 and valid L_LM 9.82 -> 8.11 (seed 1); ln(54952) = 10.91 is chance.
    assert train[-1]["loss_lm"] < train[0]["loss_lm"] - 1.0
    assert all(b["loss_lm"] < a["loss_lm"] for a, b in zip(valid, valid[1:]))
    lambdas = [lambda_for_epoch(e, 4, 0.8) for e in (1, 2, 3, 4)]
    assert [r["lambda"] for r in train[::3]] == pytest.approx(lambdas)
    for r in train:  # the logged total is the dynamic-lambda mix of its parts
        assert r["loss"] == pytest.approx((1 - r["lambda"]) * r["loss_lm"] + r["lambda"] * r["loss_st"])
    for name in ("last", "best"):
        assert (stage1_run / name / "model.safetensors").is_file()
        assert (stage1_run / name / "vocab.json").is_file()
    assert (stage1_run / "last" / "trainer_state.pt").is_file()
    assert (stage1_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    star = json.loads((stage1_run / "last" / "star_config.json").read_text())
    assert star["use_star"] is False  # stage 1 is BlenderBot-Joint


def test_plain_progress_lines_when_not_a_terminal(data_dir, tokenizer_dir, tmp_path, capsys) -> None:
    argv = ["--stage", "single", *tiny(data_dir, tmp_path, tokenizer_dir, "--epochs", "2", "--lambda0", "0.5",
                                       "--max-steps", "2", "--log-every", "1")]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1 step 1 loss" in out and "lambda 0.500" in out and "tok/s ETA" in out
    assert "stopped at --max-steps 2" in out


def two_steps_from(init: Path, stage: str, data_dir: Path, out: Path) -> tuple[dict, dict, set[str], bool]:
    """(weights before, after, the names that changed, use_star) of 2 steps at lr 1e-3 from init."""
    before = weights(init)
    argv = ["--stage", stage, "--init", str(init), "--data", str(data_dir), "--out", str(out),
            "--batch-size", "4", "--global-batch", "8", "--warmup-steps", "0", "--lr", "1e-3", "--epochs", "4",
            "--max-steps", "2"]
    assert train_cli.main(argv) == 0
    after = weights(out / "last")
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return before, after, changed, json.loads((out / "last" / "star_config.json").read_text())["use_star"]


def test_stage_2_changes_only_star_and_the_embedding(stage1_run, data_dir, tmp_path) -> None:
    before, _, changed, use_star = two_steps_from(stage1_run / "last", "2", data_dir, tmp_path)
    trainable = {k for k in before if k.startswith("star.")} | {"model.shared.weight"}
    assert changed == trainable  # every STAR tensor and the tied embedding moved; nothing else did
    assert use_star is True


def test_stage_1_from_a_joint_checkpoint_continues_joint_training(stage1_run, data_dir, tmp_path) -> None:
    """The Joint control of docs/results.md: stage 1 again from a stage-1 checkpoint trains the
    base from those weights (not from a fresh initialisation) and leaves STAR bypassed."""
    before, after, changed, use_star = two_steps_from(stage1_run / "last", "1", data_dir, tmp_path)
    assert "model.shared.weight" in changed and not any(k.startswith("star.") for k in changed)
    assert len(changed) > len(before) // 2  # the base trains, not only the embedding
    # Adam moves a weight by at most lr a step, so 2 steps 2e-3; the checkpoint's 12 steps at 1e-2
    # took its weights about 0.1 from any fresh initialisation
    assert max((after[k] - before[k]).abs().max().item() for k in changed) < 3e-3, "not started from --init"
    assert use_star is False


def test_interrupted_and_resumed_run_ends_with_the_same_weights(
    data_dir, tokenizer_dir, tmp_path, monkeypatch, capsys
) -> None:
    """Stop at --max-steps 2 (mid epoch 1), resume, Ctrl-C mid epoch 2, resume to the end: the
    weights equal those of one uninterrupted run bit for bit (dropout on, so the RNG matters)."""
    common = ["--stage", "single", "--epochs", "2", "--lambda0", "0.5", "--lr", "1e-3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_cli.main([*common, *tiny(data_dir, whole, tokenizer_dir)]) == 0

    assert train_cli.main([*common, *tiny(data_dir, parts, tokenizer_dir, "--max-steps", "2")]) == 0
    assert load_trainer_state(parts / "last")["position"]["step_in_epoch"] == 2

    step = TrainingDisplay.step

    def press_ctrl_c_at_step_4(self, rec):
        step(self, rec)
        if rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainingDisplay, "step", press_ctrl_c_at_step_4)
    assert train_cli.main(["--resume", "--out", str(parts)]) == 130
    assert "continue with: star-train --resume" in capsys.readouterr().out
    position = load_trainer_state(parts / "last")["position"]
    assert (position["epoch"], position["step_in_epoch"]) == (2, 2)  # the step in flight finished
    monkeypatch.undo()

    assert train_cli.main(["--resume", "--out", str(parts)]) == 0
    assert [r["step"] for r in train_records(parts)] == [1, 2, 3, 4, 5, 6]
    a, b = weights(whole / "last"), weights(parts / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_records(parts)] == [r["loss"] for r in train_records(whole)]


def test_two_torchrun_processes_take_the_same_first_step_as_one(data_dir, tokenizer_dir, tmp_path) -> None:
    """Global batch 8: one process x 2 micro-batches of 4, or 2 gloo processes x 1 micro-batch.
    Dropout off: its masks depend on how the batch is split."""
    common = ["--stage", "single", "--epochs", "2", "--lambda0", "0.5", "--lr", "1e-3", "--dropout", "0",
              "--max-steps", "1", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_cli.main([*common, *tiny(data_dir, one, tokenizer_dir)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "star_training.train_cli", *common, *tiny(data_dir, two, tokenizer_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first_one, first_two = train_records(one)[0], train_records(two)[0]
    for key in ("loss", "loss_lm", "loss_st"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-6)
    start = [r for r in read_jsonl(two / "log.jsonl") if r["kind"] == "start"][0]
    assert (start["world_size"], start["grad_accum"]) == (2, 1)
    a, b = weights(one / "last"), weights(two / "last")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the same update, too


# -- bad input ------------------------------------------------------------------------------------
def _other_architecture(tmp: Path, stage1: Path) -> Path:
    """A copy of a checkpoint whose config.json claims another model type."""
    folder = tmp / "bart-ckpt"
    folder.mkdir()
    for f in stage1.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    return folder


def _wider(tmp: Path, stage1: Path) -> Path:
    """A checkpoint whose config says d_model 64 but whose tensors are 32 wide."""
    folder = _other_architecture(tmp, stage1)
    config = json.loads((stage1 / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    return folder


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d, t, o, s: ["--preset", "tiny", "--data", str(o / "nowhere"), "--out", str(o / "r")],
         "does not exist"),
        (lambda d, t, o, s: ["--stage", "2", "--init", str(_other_architecture(o, s)), "--data", str(d),
                             "--out", str(o / "r")], "another architecture"),
        (lambda d, t, o, s: ["--stage", "2", "--init", str(_wider(o, s)), "--data", str(d),
                             "--out", str(o / "r")], "does not match the architecture"),
        (lambda d, t, o, s: ["--stage", "2", "--init", str(o), "--data", str(d), "--tokenizer", str(t),
                             "--out", str(o / "r")], "not a star-train checkpoint"),
        (lambda d, t, o, s: ["--stage", "2", "--preset", "tiny", "--data", str(d), "--out", str(o / "r")],
         "give its checkpoint with --init"),
        (lambda d, t, o, s: tiny(d, o / "file.txt" / "run", t), "cannot write to --out"),
        (lambda d, t, o, s: ["--resume", "--out", str(o / "empty")], "no run checkpoint"),
        (lambda d, t, o, s: tiny(d, o / "r", t, "--epochs", "2"), "lambda reaches 1.27 > 1"),
        (lambda d, t, o, s: tiny(d, o / "r", t, "--batch-size", "3"), "not a multiple of --batch-size 3"),
        (lambda d, t, o, s: tiny(d, o / "r", t, "--tokenizer", str(o)), "vocab.json"),
    ],
    ids=["missing-data", "other-architecture", "wrong-shapes", "init-not-star", "stage2-without-init", "unwritable-out",
         "resume-nothing", "lambda-above-1", "batch-not-dividing", "bad-tokenizer"],
)
def test_bad_input_is_one_clear_message(make_argv, message, data_dir, tokenizer_dir, stage1_run, tmp_path,
                                        capsys) -> None:
    (tmp_path / "file.txt").write_text("a file, not a folder")
    argv = make_argv(data_dir, tokenizer_dir, tmp_path, stage1_run / "last")
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("star-train: error: ") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--epochs", "0"), ("--batch-size", "x"),
                                         ("--beta2", "1.5"), ("--warmup-steps", "-3")])
def test_out_of_range_options_exit_with_usage(flag, value, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train_cli.main([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_resume_refuses_changed_settings(stage1_run, capsys) -> None:
    assert train_cli.main(["--resume", "--out", str(stage1_run), "--lr", "5e-3"]) == 2
    assert "--lr 0.005 (the run used 0.01)" in capsys.readouterr().err


def test_console_script_reports_without_traceback(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "star_training.train_cli", "--data", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"star-train: error: --data {tmp_path / 'none'} does not exist; pass a folder of "
                                  "train/valid/test.txt files or an ESConv.json")


def test_an_unusable_device_is_a_user_error(monkeypatch, capsys) -> None:
    from star_training.cli_common import run_cli
    from star_training.distributed import TorchDeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TorchDeviceError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert run_cli("star-train", lambda: resolve_device("tpu") and 0) == 2
    assert capsys.readouterr().err == "star-train: error: --device must be auto, cpu or cuda, not 'tpu'\n"
