"""What a training run shows and records: a live display, a JSONL log, and the curves PNG.

The display is a rich progress bar on a terminal and plain lines elsewhere (a log file, CI),
so redirected output stays readable. The JSONL log has one record per optimizer step
(`"kind": "train"`) and one per validation (`"kind": "valid"`), after a `"kind": "start"` record
per attempt; the PNG is drawn from it. Every record carries `"attempt"`: 1 for the first run,
one more for each --resume. A resumed attempt restarts from its checkpoint's step, so the steps
a killed attempt logged after that checkpoint appear twice; `current_records` keeps, for each
step, the attempt whose result the weights hold (the latest).
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
    """Append-only JSON-lines log, flushed per record so a killed run keeps what it logged.

    Every record gets `"attempt": attempt` (module docstring)."""

    def __init__(self, path: Path, *, append: bool = False, attempt: int = 1) -> None:
        self.path, self.attempt = path, attempt
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({**record, "attempt": self.attempt}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short (a kill or a full disk mid-write) is
    left out, any other bad line is an error."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise
    return records


def is_training_log(path: Path) -> bool:
    """Whether `path` is a log star-train wrote: JSON lines opening with a "start" record."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(first, dict) and first.get("kind") == "start"


def next_attempt(path: Path) -> int:
    """The attempt number of a run that appends to the log at `path` (1 when there is none)."""
    if not Path(path).is_file():
        return 1
    starts = [r.get("attempt", 1) for r in read_jsonl(path) if r.get("kind") == "start"]
    return max(starts, default=0) + 1


def current_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run as its weights hold it: when attempt a starts at step s (from a
    checkpoint), what earlier attempts logged after step s is dropped (module docstring)."""
    kept: list[dict[str, Any]] = []
    for record in records:
        if record.get("kind") == "start" and kept:
            kept = [r for r in kept if r["step"] <= record["step"]]
        kept.append(record)
    return kept


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Losses (train per step, validation per epoch), learning rate and lambda against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = current_records(read_jsonl(log_path))
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    fig, (ax_loss, ax_lr, ax_lam) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    steps = [r["step"] for r in train]
    strategy = any(r["lambda"] > 0 for r in train)  # stage 0 has no strategy target
    for key in ("loss", "loss_lm", "loss_st") if strategy else ("loss_lm",):
        ax_loss.plot(steps, [r[key] for r in train], label=f"train {key}", linewidth=0.8)
    for key in ("loss_lm", "loss_st"):
        if valid and key in valid[0]:
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
