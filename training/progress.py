"""What a training run shows and records: a live display, a JSONL log, and the curves PNG.

The display is a rich progress bar on a terminal and plain lines elsewhere (a log file, CI),
so redirected output stays readable. The JSONL log has one record per optimizer step
(`"kind": "train"`) and one per validation (`"kind": "valid"`); the PNG is drawn from it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from star_training.folders import save_figure_atomically


def format_step(rec: dict[str, Any]) -> str:
    """One line for a train record: epoch, step, loss parts, lambda, lr, tokens/s."""
    return (
        f"epoch {rec['epoch']} step {rec['step']} loss {rec['loss']:.4f} "
        f"(lm {rec['loss_lm']:.4f}, st {rec['loss_st']:.4f}) lambda {rec['lambda']:.3f} "
        f"lr {rec['lr']:.2e} {rec['tokens_per_s']:,.0f} tok/s"
    )


class TrainingDisplay:
    """Live progress of optimizer steps `start_step..total_steps`.

    On a terminal: a rich bar (epoch, steps, elapsed, ETA) over a line with the latest step's
    numbers. Otherwise a plain line every `every` steps (and at the last), with an ETA from the
    mean step time so far.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, every: int = 10, file: TextIO | None = None) -> None:
        self.console = Console(file=file or sys.stdout)
        self.total, self.start, self.every = total_steps, start_step, max(1, every)
        self.t0 = time.perf_counter()
        self._live: Live | None = None
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, epoch="-")
            self._info = Text()
            self._live = Live(Group(self._bar, self._info), console=self.console, refresh_per_second=4)

    def __enter__(self) -> "TrainingDisplay":
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def step(self, rec: dict[str, Any]) -> None:
        if self._live is not None:
            self._bar.update(self._task, completed=rec["step"], epoch=rec["epoch"])
            self._info.plain = format_step(rec)
            return
        step = rec["step"]
        if step % self.every and step != self.total:
            return
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        self.console.print(f"{format_step(rec)} ETA {_hms(eta)}", highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class JsonlLog:
    """Append-only JSON-lines log, flushed per record so a killed run keeps what it logged."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        self.path = path
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Losses (train per step, validation per epoch), learning rate and lambda against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    fig, (ax_loss, ax_lr, ax_lam) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    steps = [r["step"] for r in train]
    for key in ("loss", "loss_lm", "loss_st"):
        ax_loss.plot(steps, [r[key] for r in train], label=f"train {key}", linewidth=0.8)
    for key in ("loss_lm", "loss_st"):
        ax_loss.plot([r["step"] for r in valid], [r[key] for r in valid], "o-", label=f"valid {key}")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set_ylabel("learning rate")
    ax_lam.plot(steps, [r["lambda"] for r in train])
    ax_lam.set_ylabel("lambda")
    ax_lam.set_xlabel("optimizer step")
    fig.tight_layout()
    save_figure_atomically(fig, png_path, dpi=100)
