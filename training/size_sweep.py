"""Choose the compact model size by validation PPL at an equal wall-clock budget.

    python -m star_training.size_sweep --seconds 150 --out runs/size-sweep

Each candidate (BlenderBot-Small's architecture at a smaller width/depth) is built from random
weights and trained with stage 1's objective on the train split for the same number of seconds
on this machine, then scored teacher-forced on the first --valid-examples of the valid split.
Equal *time*, not equal steps, because the constraint the compact model answers to is a CPU's
hour: a smaller model takes more steps in it. Writes OUT/sweep.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from star_training.cli_common import (DEFAULT_TOKENIZER, add_common_args, positive_float, positive_int,
                                      resolve_data_path, run_cli)
from star_training.config import PRESETS, sized
from star_training.distributed import setup
from star_training.teacher_forced import teacher_forced_scores
from star_training.trainer import TrainConfig, Trainer, epoch_steps, lambda_for_epoch
from star_runtime.atomic import write_text_atomically


# Candidates at most ~14 min per epoch of the 12,271 train examples on a 2-core CPU at batch 16
# (measured: d256 4+4 18.8 min, d256 2+2 14.0, d192 3+3 13.1), so that the 4 epochs the dynamic
# lambda needs (lambda(E_max) <= 1 from E_max = 4 at lambda0 0.8) fit in an hour per stage.
CANDIDATES: dict[str, dict[str, int]] = {
    "d256-L2-ffn1024": sized(256, 2, 1024, heads=4),
    "d192-L3-ffn768": sized(192, 3, 768, heads=4),
    "d128-L4-ffn512": sized(128, 4, 512, heads=4),
}


def train_for(cfg: TrainConfig, seconds: float, valid_examples: int) -> dict[str, float]:
    """Train `cfg` for `seconds` (whole optimizer steps), then score the valid prefix."""
    trainer = Trainer(cfg, setup(cfg.device))
    steps = epoch_steps(trainer.sampler, 1, cfg.batch_size, trainer.accum)
    lam = lambda_for_epoch(1, cfg.epochs, cfg.lambda0)
    start, done = time.perf_counter(), 0
    while done < len(steps) and time.perf_counter() - start < seconds:
        trainer.train_step(steps[done], lam)
        done += 1
    elapsed = time.perf_counter() - start
    scores = teacher_forced_scores(
        trainer.model, trainer.valid_examples[:valid_examples], pad_id=trainer.tok.pad_id,
        batch_size=cfg.batch_size, device=trainer.ctx.device,
    )
    return {"steps": done, "seconds": elapsed, "s_per_step": elapsed / max(done, 1),
            "parameters": sum(p.numel() for p in trainer.model.parameters()), **scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="size_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/size-sweep"))
    p.add_argument("--seconds", type=positive_float, default=150.0, help="training time per candidate")
    p.add_argument("--valid-examples", type=positive_int, default=800)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--candidates", nargs="+", choices=tuple(CANDIDATES), default=list(CANDIDATES))

    args = p.parse_args(argv)

    def run() -> int:
        data = resolve_data_path(args.data)
        results = {}
        for name in args.candidates:
            PRESETS[name] = CANDIDATES[name]  # load_model(preset=...) reads PRESETS
            cfg = TrainConfig(out=str(args.out / name), data=str(data), tokenizer=str(DEFAULT_TOKENIZER),
                              seed=42 if args.seed is None else args.seed, preset=name, lr=args.lr, epochs=4,
                              warmup_steps=30, batch_size=args.batch_size, global_batch=args.batch_size,
                              device=args.device or "auto")
            results[name] = train_for(cfg, args.seconds, args.valid_examples)
            r = results[name]
            print(f"{name:18s} {r['parameters'] / 1e6:5.1f}M params  {r['steps']:4d} steps "
                  f"({r['s_per_step']:.2f} s/step)  valid PPL {r['ppl']:8.2f}  strategy acc "
                  f"{r['strategy_accuracy']:.1f}%", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out / "sweep.json", json.dumps(
            {"seconds": args.seconds, "lr": args.lr, "batch_size": args.batch_size,
             "valid_examples": args.valid_examples, "results": results}, indent=2))
        best = min(results, key=lambda n: results[n]["ppl"])
        print(f"lowest validation PPL: {best}")
        return 0

    return run_cli("size_sweep", run)


if __name__ == "__main__":
    raise SystemExit(main())
