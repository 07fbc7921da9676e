"""star-analyze: how much the two tasks interfere, for one or more saved models (paper Table 1, Figure 3).

    star-analyze --checkpoint runs/joint/best --checkpoint runs/star/best --split valid --out docs/analysis

For each model, on the same seeded sample of the split:
  - the cosine of grad L_LM and grad L_ST over the parameters both losses reach, per batch, with
    the mean and a 95% t-interval (star_training.interference; paper: -0.05 Joint, 0.47 STAR);
  - the final decoder states at the response positions (mean per example; h' for generation and,
    with STAR, also h), t-SNE to 2D, K-means with k = 8, silhouette and adjusted Rand index
    against the gold strategies (star_training.hidden_clusters).
Writes OUT/analysis.json, OUT/clusters_<model>.png per model and, with several models,
OUT/clusters.png with one panel per model (its generation state). Files in OUT are replaced only
when OUT/analysis.json is star-analyze's own.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from star_runtime.strategies import STRATEGY_NAMES
from star_training.checkpoint import CheckpointError, load_model, resolve_checkpoint
from star_training.cli_common import (
    DEFAULT_TOKENIZER,
    CliError,
    add_common_args,
    check_own_outputs,
    load_tokenizer,
    positive_int,
    resolve_data_path,
    run_cli,
    seed_everything,
)
from star_training.cluster_plot import Panel, plot_panels
from star_training.data import Example, build_examples, collate, load_conversations
from star_training.distributed import resolve_device
from star_runtime.atomic import write_text_atomically
from star_runtime.terminal import printable
from star_training.hidden_clusters import K, STATE_FUSED, STATE_H, cluster_states, response_states
from star_training.interference import GROUPS, Interval, gradient_cosine
from star_training.run_state import read_train_config

PROG = "star-analyze"
JOINT, STAR = "BlenderBot-Joint", "BlenderBot-Joint + STAR"
PAPER_TABLE_1 = {JOINT: -0.05, STAR: 0.47}  # gradient cosine of L_LM and L_ST, pretrained BlenderBot-Small


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", required=True,
                   help="a star-train run folder (its best/, else last/) or a checkpoint folder in one; repeat for "
                   "several (e.g. Joint, then STAR)")
    add_common_args(p)
    p.add_argument("--split", choices=("valid", "test"), default="valid", help="(default: valid)")
    p.add_argument("--batches", type=positive_int, default=50, help="batches for the gradient cosine (default: 50)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    p.add_argument("--max-points", type=_points, default=2000,
                   help=f"examples whose states are clustered, at least {K + 1} (default: 2000)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help=f"tokenizer folder (default: the checkpoint's, else {DEFAULT_TOKENIZER})")
    return p


def _points(text: str) -> int:
    value = int(text)
    if value <= K:
        raise argparse.ArgumentTypeError(f"must be at least {K + 1} (K-means uses k = {K}), not {text}")
    return value


def _interval(iv: Interval, values: list[float]) -> dict[str, Any]:
    return {"mean": iv.mean, "ci95": None if iv.low is None else [iv.low, iv.high], "per_batch": values}




def analyse_model(
    checkpoint: Path, args: argparse.Namespace, data_path: Path, seed: int, device: Any
) -> tuple[dict[str, Any], list[Panel]]:
    """Everything analysis.json records for one model, and its figure panels (generation state first)."""
    tok = load_tokenizer(args.tokenizer, checkpoint)
    try:
        model = load_model(checkpoint, vocab_size=tok.vocab_size).to(device)
    except CheckpointError as e:
        raise CliError(str(e)) from e
    trained = read_train_config(checkpoint) or {}
    settings = {"max_source": trained.get("max_source", 160), "max_target": trained.get("max_target", 40),
                "use_situation": trained.get("use_situation", True)}  # as trained, else the paper's
    examples = build_examples(load_conversations(data_path, args.split), tok, **settings)
    if len(examples) <= K:
        raise CliError(f"{data_path}: the {args.split} split has {len(examples)} supporter turns; "
                       f"clustering needs at least {K + 1}")
    seed_everything(seed)
    order: list[Example] = list(examples)
    random.Random(seed).shuffle(order)  # one seeded sample; every model with the same settings sees it
    grad_examples = order[: args.batches * args.batch_size]
    batches = [collate(grad_examples[i : i + args.batch_size], tok.pad_id)
               for i in range(0, len(grad_examples), args.batch_size)]
    cos = gradient_cosine(model, batches, device=device)

    points = order[: args.max_points]
    gold = np.array([e.strategy for e in points])
    states = response_states(model, points, pad_id=tok.pad_id, batch_size=args.batch_size, device=device)
    star = model.star_config.use_star
    label = STAR if star else JOINT
    # Without STAR, h' is h: one state. With STAR, h' (generation) first, then h.
    names = [STATE_FUSED, STATE_H] if star else [STATE_H]
    clusterings = {name: cluster_states(states[name], gold, seed=seed) for name in names}
    panels = [Panel(f"{label}: {name}", clusterings[name], gold) for name in names]
    record = {
        "checkpoint": str(checkpoint.resolve()),
        "label": label,
        "star": star,
        "trained_from": {k: trained.get(k) for k in ("stage", "preset", "base", "init", "epochs")},
        "data_settings": settings,
        "examples_in_split": len(examples),
        "gradient_cosine": {
            "parameters": "shared: every tensor both losses reach (autograd); embedding: the tied token embedding",
            "shared_tensors": len(cos.shared_names),
            "shared_parameters": cos.shared_numel,
            "batches": len(batches),
            "examples": len(grad_examples),
            **{g: _interval(cos.interval[g], cos.per_batch[g]) for g in GROUPS},
        },
        "hidden_states": {
            "pooling": "mean over the response positions (t >= 1 with a scored label), teacher-forced, gold strategy",
            "generation_state": names[0],
            "points": len(points),
            "gold_counts": {name: int((gold == k).sum()) for k, name in enumerate(STRATEGY_NAMES)},
            "k": K,
            **{name: {"silhouette": c.silhouette, "ari": c.ari} for name, c in clusterings.items()},
        },
    }
    return record, panels


def _json_safe(obj: Any) -> Any:
    """NaN (a zero gradient, a single K-means cluster) as JSON null, which strict JSON readers accept."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _slug(label: str, taken: set[str]) -> str:
    base = "star" if label == STAR else "joint"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}{n}", n + 1
    taken.add(slug)
    return slug


def _fmt(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _cos_cell(c: dict[str, Any]) -> str:
    ci = c["ci95"]
    return _fmt(c["mean"]) + ("" if ci is None else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]")


def results_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Interference on the {report['split']} split (cosine: mean [95% CI])")
    for header in ("model", "cos shared", "cos embedding", "batches", "state", "silhouette", "ARI", "points"):
        table.add_column(header, justify="left" if header in ("model", "state") else "right")
    for name, value in PAPER_TABLE_1.items():
        table.add_row(f"paper: {name}", _fmt(value), "", "", "", "", "", "")
    for m in report["models"]:
        g, hs = m["gradient_cosine"], m["hidden_states"]
        for i, state in enumerate([hs["generation_state"]] + [s for s in (STATE_H,) if m["star"]]):
            first = i == 0
            table.add_row(f"ours: {m['label']}" if first else "",
                          _cos_cell(g["shared"]) if first else "", _cos_cell(g["embedding"]) if first else "",
                          str(g["batches"]) if first else "", state, _fmt(hs[state]["silhouette"]),
                          _fmt(hs[state]["ari"]), str(hs["points"]) if first else "")
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        seed = 42 if args.seed is None else args.seed
        device = resolve_device(args.device or "auto")
        data_path = resolve_data_path(args.data)
        resolved = []
        for checkpoint in args.checkpoint:  # all of them before minutes of work on the first
            folder, which = resolve_checkpoint(checkpoint)
            if which:
                print(f"{PROG}: using {printable(which)}", file=sys.stderr)
            resolved.append(folder)
        args.checkpoint = resolved
        figures = tuple(p.name for p in args.out.glob("clusters*.png")) if args.out.is_dir() else ()
        check_own_outputs(args.out, ("analysis.json", *figures), "analysis.json", {"paper_table_1", "models"}, PROG)
        analysed = [analyse_model(checkpoint, args, data_path, seed, device) for checkpoint in args.checkpoint]
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"cannot create --out {args.out}: {e.strerror or e}; choose another --out") from e
        models, taken = [], set()
        for record, panels in analysed:
            record["figure"] = f"clusters_{_slug(record['label'], taken)}.png"
            plot_panels(panels, args.out / record["figure"])
            models.append(record)
        all_panels = [panels[0] for _, panels in analysed]  # each model's generation state
        report = {
            "split": args.split, "data": str(data_path), "seed": seed, "device": str(device),
            "batch_size": args.batch_size, "batches_requested": args.batches, "max_points": args.max_points,
            "confidence": 0.95, "paper_table_1": PAPER_TABLE_1, "models": models,
        }
        if len(all_panels) > 1:
            report["figure"] = "clusters.png"
            plot_panels(all_panels, args.out / report["figure"])
        write_text_atomically(args.out / "analysis.json", json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
        console = Console()
        if not console.is_terminal:  # a log or a pipe: rich would wrap at 80 columns; the table needs ~135
            console = Console(width=140)
        console.print(results_table(report))
        notes = [f"{m['label']}: {m['gradient_cosine']['batches']} of {args.batches} batches (the split is smaller)"
                 for m in models if m["gradient_cosine"]["batches"] < args.batches]
        for line in notes + [f"written to {args.out}"]:
            print(printable(line))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
