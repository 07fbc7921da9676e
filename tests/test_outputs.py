"""What the training-side commands write, and what they refuse to replace or cannot survive.

star-train replaces only its own outputs; a killed save leaves nothing that the next run does not
clean up; a full disk is one line with the previous checkpoint intact; log.jsonl says which
attempt wrote each line; star-export, star-eval and star-analyze take a star-train run folder;
an edited config.json with absurd sizes is refused before anything is allocated. The tiny preset
on the project-written ESConv fixture (3 optimizer steps per epoch, tests/test_train.py).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esconv_fixture import write_esconv
from star_training import analyze_cli, eval_cli, train_cli
from star_training.checkpoint import CheckpointError, load_model
from star_training.progress import read_jsonl
from star_training.run_state import load_trainer_state, save_model_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_esconv(tmp_path_factory.mktemp("esconv"))


def tiny(data: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--stage", "single", "--data", str(data), "--tokenizer", str(tokenizer),
            "--out", str(out), "--batch-size", "4", "--global-batch", "8", "--warmup-steps", "0", "--seed", "3",
            "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def two_steps(data_dir, tokenizer_dir, tmp_path_factory) -> Path:
    """A run stopped at --max-steps 2: OUT/last only (best/ comes at the end of epoch 1, step 3)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train_cli.main(tiny(data_dir, out, tokenizer_dir, "--max-steps", "2")) == 0
    assert (out / "last").is_dir() and not (out / "best").exists()
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def dead_pid() -> int:
    """The id of a process that has ended (what a SIGKILLed star-train leaves in its temp names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "trainer_state.pt")


# -- star-train replaces only what it wrote ------------------------------------------------------
@pytest.mark.parametrize("name", ["last", "best"])
def test_train_refuses_to_replace_a_folder_that_is_not_a_checkpoint(name, data_dir, tokenizer_dir, tmp_path,
                                                                    capsys) -> None:
    out = tmp_path / "runs" / "x"
    (out / name).mkdir(parents=True)
    (out / name / "notes.txt").write_text("my notes")
    assert train_cli.main(tiny(data_dir, out, tokenizer_dir, "--max-steps", "3")) == 2
    line = one_line(capsys.readouterr().err, "star-train")
    assert f"{out / name} exists and is not a star-train checkpoint" in line and "choose another --out" in line
    assert (out / name / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written


def test_train_refuses_a_log_it_did_not_write(data_dir, tokenizer_dir, tmp_path, capsys) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "log.jsonl").write_text("my own log\n")
    assert train_cli.main(tiny(data_dir, out, tokenizer_dir, "--max-steps", "1")) == 2
    assert "log.jsonl exists and is not from a star-train run" in one_line(capsys.readouterr().err, "star-train")
    assert (out / "log.jsonl").read_text() == "my own log\n"


def test_a_save_refuses_a_folder_that_appeared_meanwhile(two_steps, tmp_path) -> None:
    dest = tmp_path / "best"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    model = load_model(two_steps / "last")
    from star_runtime.tokenizer import Tokenizer

    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_model_folder(dest, model, Tokenizer.from_dir(two_steps / "last"), {})
    assert (dest / "notes.txt").read_text() == "mine"


# -- run folders are accepted by the other commands ----------------------------------------------
def test_resolve_checkpoint_prefers_best_then_last(two_steps, tmp_path) -> None:
    from star_training.checkpoint import resolve_checkpoint

    run = copy_run(two_steps, tmp_path / "run")
    folder, which = resolve_checkpoint(run)
    assert folder == run / "last" and "no best/ yet" in which
    shutil.copytree(run / "last", run / "best")
    folder, which = resolve_checkpoint(run)
    assert folder == run / "best" and "best validation loss" in which
    assert resolve_checkpoint(run / "last") == (run / "last", None)
    for bad, message in ((tmp_path / "none", "no such folder"), (tmp_path, "nor a star-train run folder")):
        with pytest.raises(CheckpointError, match=message) as err:
            resolve_checkpoint(bad)
        assert "star-train run folder (its --out)" in str(err.value) or "--out folder of star-train" in str(err.value)


def test_the_design_cards_flow_works_as_written(esconv_dir, tokenizer_dir, tmp_path) -> None:
    """`star-train --preset tiny --max-steps 2 --out ckpt && star-export --checkpoint ckpt/ --out
    model.onnx`, the literal command line (default data and tokenizer: ../shared/data)."""
    bin_dir = Path(sys.executable).parent
    scripts = [bin_dir / "star-train", bin_dir / "star-export"]
    if all(s.is_file() for s in scripts):
        command = ("star-train --preset tiny --max-steps 2 --out ckpt && "
                   "star-export --checkpoint ckpt/ --out model.onnx")
    else:  # not installed: the same modules
        command = (f"{sys.executable} -m star_training.train_cli --preset tiny --max-steps 2 --out ckpt && "
                   f"{sys.executable} -m star_export.cli --checkpoint ckpt/ --out model.onnx")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if env.get("PYTHONPATH"):  # absolute, as the commands run in tmp_path
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep))
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "using checkpoint ckpt/last" in done.stderr
    from star_runtime import Runtime

    assert Runtime.load(tmp_path / "model.onnx", threads=1).generate([5, 6, 7], max_new_tokens=2).tokens


def test_eval_and_analyze_take_a_run_folder(two_steps, data_dir, tmp_path, capsys) -> None:
    assert eval_cli.main([str(two_steps), "--data", str(data_dir), "--out", str(tmp_path / "ev"), "--limit", "2",
                          "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert f"star-eval: using checkpoint {two_steps / 'last'}" in capsys.readouterr().err
    assert json.loads((tmp_path / "ev" / "scores.json").read_text())["model"] == str((two_steps / "last").resolve())
    assert analyze_cli.main(["--checkpoint", str(two_steps), "--data", str(data_dir), "--out", str(tmp_path / "an"),
                             "--batches", "1", "--batch-size", "4", "--max-points", "9", "--split", "valid",
                             "--device", "cpu"]) == 0
    assert f"star-analyze: using checkpoint {two_steps / 'last'}" in capsys.readouterr().err


def test_eval_refuses_to_replace_files_it_did_not_write(two_steps, data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    out.mkdir()
    (out / "scores.md").write_text("my table")
    assert eval_cli.main([str(two_steps), "--data", str(data_dir), "--out", str(out), "--limit", "2"]) == 2
    assert "star-eval did not write" in one_line(capsys.readouterr().err, "star-eval")
    assert (out / "scores.md").read_text() == "my table"


def test_analyze_refuses_to_replace_files_it_did_not_write(two_steps, data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "an"
    out.mkdir()
    (out / "clusters_star.png").write_bytes(b"my figure")
    assert analyze_cli.main(["--checkpoint", str(two_steps), "--data", str(data_dir), "--out", str(out)]) == 2
    assert "star-analyze did not write" in one_line(capsys.readouterr().err, "star-analyze")
    assert (out / "clusters_star.png").read_bytes() == b"my figure"


# -- a full disk ----------------------------------------------------------------------------------
def test_full_disk_during_train_is_one_line_and_leaves_no_temp_folder(data_dir, tokenizer_dir, tmp_path,
                                                                      monkeypatch, capsys) -> None:
    from star_training import run_state

    monkeypatch.setattr(run_state.torch, "save", no_space)
    out = tmp_path / "run"
    assert train_cli.main(tiny(data_dir, out, tokenizer_dir, "--max-steps", "2")) == 1
    line = one_line(capsys.readouterr().err, "star-train")
    assert "no space left on the device" in line and "run the same command again" in line
    assert not (out / "last").exists() and not list(out.glob(".last*"))


def test_full_disk_during_resume_keeps_the_checkpoint(two_steps, tmp_path, monkeypatch, capsys) -> None:
    from star_training import run_state

    run = copy_run(two_steps, tmp_path / "run")
    before = (run / "last" / "model.safetensors").read_bytes()
    monkeypatch.setattr(run_state.torch, "save", no_space)
    assert train_cli.main(["--resume", "--out", str(run), "--max-steps", "3"]) == 1
    line = one_line(capsys.readouterr().err, "star-train")
    assert f"continue with star-train --resume --out {run}" in line
    monkeypatch.undo()
    assert (run / "last" / "model.safetensors").read_bytes() == before
    assert load_trainer_state(run / "last")["position"]["global_step"] == 2
    assert not list(run.glob(".last*"))


def test_full_disk_during_eval_keeps_the_previous_results(two_steps, data_dir, tmp_path, monkeypatch,
                                                          capsys) -> None:
    argv = [str(two_steps / "last"), "--data", str(data_dir), "--out", str(tmp_path / "ev"), "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu"]
    assert eval_cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()}
    real = pathlib.Path.write_text

    def fills_the_disk(self, text, *args, **kwargs):
        if ".tmp-" in self.name:  # the atomic writer's temp file: half of it, then ENOSPC
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", fills_the_disk)
    assert eval_cli.main([*argv, "--seed", "7"]) == 1
    monkeypatch.undo()
    assert "no space left on the device" in one_line(capsys.readouterr().err, "star-eval")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()} == before


# -- a killed save, and the log of several attempts ------------------------------------------------
def test_a_save_killed_between_its_renames_is_recovered_by_the_next_run(two_steps, tmp_path, capsys) -> None:
    """The state SIGKILL leaves between write_folder_atomically's two renames: the new checkpoint
    complete in .last.tmp-PID, the previous one renamed to .last.old, no OUT/last."""
    run = copy_run(two_steps, tmp_path / "run")
    temp = run / f".last.tmp-{dead_pid()}"
    shutil.copytree(run / "last", temp)
    os.replace(run / "last", run / ".last.old")
    stale = run / f".best.tmp-{dead_pid()}"  # killed while filling best/: incomplete
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (run / "keep.txt").write_text("not ours")
    assert train_cli.main(["--resume", "--out", str(run), "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "put in place the complete copy" in err and f"removed {stale.name}" in err
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "keep.txt", "last", "log.jsonl"]
    assert load_trainer_state(run / "last")["position"]["global_step"] == 3


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
real = os.replace

def replace(src, dst):  # SIGKILL at the second rename of OUT/last: the new folder is complete
    if ".last.tmp-" in Path(src).name and (Path(dst).parent / ".last.old").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)

os.replace = replace
from star_training.train_cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_sigkill_between_the_renames_is_recovered(two_steps, tmp_path) -> None:
    run = copy_run(two_steps, tmp_path / "run")
    env = {**os.environ}
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep))
    args = ["--resume", "--out", str(run), "--max-steps", "3"]
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not (run / "last").exists() and (run / ".last.old").is_dir() and len(list(run.glob(".last.tmp-*"))) == 1
    again = subprocess.run([sys.executable, "-m", "star_training.train_cli", *args], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "put in place the complete copy" in again.stderr and "nothing to do" in again.stdout
    assert load_trainer_state(run / "last")["position"]["global_step"] == 3  # the killed run's save, kept
    assert not list(run.glob(".*"))


def test_a_save_killed_while_filling_leaves_the_previous_checkpoint(two_steps, tmp_path, capsys) -> None:
    run = copy_run(two_steps, tmp_path / "run")
    temp = run / f".last.tmp-{dead_pid()}"
    temp.mkdir()
    (temp / "config.json").write_text("{}")  # incomplete
    os.replace(run / "last", run / ".last.old")  # and, say, an older crash's aside copy
    assert train_cli.main(["--resume", "--out", str(run), "--max-steps", "3"]) == 0
    assert "restored the previous copy" in capsys.readouterr().err
    assert not list(run.glob(".*"))


def test_log_records_each_attempt_and_the_curves_use_the_latest(two_steps, tmp_path, monkeypatch) -> None:
    from star_training import run_state
    from star_training.progress import current_records

    run = copy_run(two_steps, tmp_path / "run")
    monkeypatch.setattr(run_state.torch, "save", no_space)  # attempt 2 logs step 3, then cannot save it
    assert train_cli.main(["--resume", "--out", str(run), "--max-steps", "3"]) == 1
    monkeypatch.undo()
    assert train_cli.main(["--resume", "--out", str(run), "--max-steps", "3"]) == 0  # attempt 3 redoes step 3
    records = read_jsonl(run / "log.jsonl")
    starts = [(r["attempt"], r["step"]) for r in records if r["kind"] == "start"]
    assert starts == [(1, 0), (2, 2), (3, 2)]
    train = [(r["attempt"], r["step"]) for r in records if r["kind"] == "train"]
    assert train == [(1, 1), (1, 2), (2, 3), (3, 3)]
    assert [(r["attempt"], r["step"]) for r in current_records(records) if r["kind"] == "train"] == [
        (1, 1), (1, 2), (3, 3)]


def test_a_log_line_cut_by_a_kill_is_skipped(tmp_path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "start", "step": 0}\n{"kind": "train", "st')
    assert read_jsonl(log) == [{"kind": "start", "step": 0}]


# -- absurd sizes in an edited config.json ---------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    ({"d_model": 10**6}, "describes a model of at least"),
    ({"encoder_layers": 10**5}, "describes a model of at least"),
    ({"decoder_ffn_dim": -5}, "must be positive integers"),
    ({"vocab_size": "many"}, "must be positive integers"),
    ({"decoder_layers": 2.5}, "must be positive integers"),
])
def test_absurd_config_sizes_are_one_line_before_any_allocation(edit, message, two_steps, tmp_path, data_dir,
                                                                 capsys) -> None:
    from star_export.cli import main as export_main

    ckpt = shutil.copytree(two_steps / "last", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **edit}))
    start = time.perf_counter()
    assert eval_cli.main([str(ckpt), "--data", str(data_dir), "--out", str(tmp_path / "ev"), "--limit", "1"]) == 2
    assert message in one_line(capsys.readouterr().err, "star-eval")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 2
    assert message in one_line(capsys.readouterr().err, "star-export")
    assert time.perf_counter() - start < 30  # no model is built: the time is loading torch and the data
    assert not (tmp_path / "b").exists()
