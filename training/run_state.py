"""A training checkpoint: the model folder, plus what `--resume` needs to continue exactly.

    OUT/last/                 the model's checkpoint folder (save_model) (configs, weights, tokenizer)
        train_config.json     the run's settings (star-eval reads the data settings from it)
        trainer_state.pt      optimizer, scheduler, RNG of every rank, position, run config
    OUT/best/                 the model folder at the best validation loss (no trainer state)

Both are written into a temporary folder and renamed into place (`folders.py`), so an
interruption leaves the previous checkpoint, never half of a new one, and both replace only a
checkpoint or an empty folder (`checkpoint.check_replaceable`). `recover_run_folder` cleans what
a killed save left before the next run writes. The position says what is
done: `step_in_epoch` optimizer steps of `epoch`; an epoch that has finished is recorded as
(epoch + 1, 0). With the data order a pure function of (seed, epoch) and the RNG restored, a
resumed run replays exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from star_runtime.tokenizer import Tokenizer
from star_training.checkpoint import RUN_BEST, RUN_LAST, check_replaceable, is_checkpoint, save_model
from star_training.distributed import DistContext
from star_training.folders import existing_folder, recover_folder, write_folder_atomically
from star_training.model import StarForConditionalGeneration

TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
STATE_VERSION = 1


@dataclass
class Position:
    epoch: int = 1  # the epoch in progress or next, 1-based
    step_in_epoch: int = 0  # optimizer steps of `epoch` already taken
    global_step: int = 0  # optimizer steps taken in the whole run
    best_val: float = math.inf  # lowest validation loss so far


def rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(ctx: DistContext) -> list[dict[str, Any]]:
    """The RNG state of every rank (dropout differs per rank), collected on all of them."""
    mine = rng_state(ctx.device)
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


def save_run_checkpoint(
    dest: Path,
    model: StarForConditionalGeneration,
    tokenizer: Tokenizer,
    *,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    position: Position,
    run_config: dict[str, Any],
    rng_states: list[dict[str, Any]],
) -> None:
    """Write OUT/last: the model folder with trainer_state.pt inside, atomically."""
    state = {
        "version": STATE_VERSION,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": asdict(position),
        "run_config": run_config,
        "rng": rng_states,
    }

    def fill(tmp: Path) -> None:
        _fill_model_folder(tmp, model, tokenizer, run_config)
        torch.save(state, tmp / TRAINER_STATE)

    check_replaceable(dest)
    write_folder_atomically(dest, fill)


def save_model_folder(
    dest: Path, model: StarForConditionalGeneration, tokenizer: Tokenizer, run_config: dict[str, Any]
) -> None:
    """Write a model-only folder (OUT/best) atomically."""
    check_replaceable(dest)
    write_folder_atomically(dest, lambda tmp: _fill_model_folder(tmp, model, tokenizer, run_config))


def _fill_model_folder(
    tmp: Path, model: StarForConditionalGeneration, tokenizer: Tokenizer, run_config: dict[str, Any]
) -> None:
    save_model(model, tmp)  # into the empty folder first: save_model replaces only checkpoints
    tokenizer.save(tmp)
    # How the model was trained, for star-eval (the data settings) and for readers.
    (tmp / TRAIN_CONFIG).write_text(json.dumps(run_config, indent=2) + "\n")


def read_train_config(folder: Path) -> dict[str, Any] | None:
    """train_config.json of a model folder star-train wrote, or None for other folders."""
    path = Path(folder) / TRAIN_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run_checkpoint(folder: Path) -> bool:
    """A checkpoint with the trainer state --resume needs (what OUT/last holds)."""
    return is_checkpoint(folder) and (Path(folder) / TRAINER_STATE).is_file()


def recover_run_folder(out: Path) -> list[str]:
    """Clean OUT/last and OUT/best of what a killed save left (folders.recover_folder)."""
    return (recover_folder(Path(out) / RUN_LAST, is_run_checkpoint)
            + recover_folder(Path(out) / RUN_BEST, is_checkpoint))


def find_run_checkpoint(folder: Path) -> Path | None:
    """The checkpoint folder to resume from (or the copy a crash mid-save left aside)."""
    found = existing_folder(folder)
    return found if found is not None and (found / TRAINER_STATE).is_file() else None


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint folder (tensors, numbers and strings only)."""
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{folder / TRAINER_STATE}: version {state.get('version')!r}, expected {STATE_VERSION}")
    return state
