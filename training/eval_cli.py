"""star-eval: score a saved model on an ESConv split, in the columns of the paper's Table 2.

    star-eval runs/star                                # a run folder: its best/ (else last/)
    star-eval runs/star/best                           # test split, paper decoding, seed 42
    star-eval runs/star/best --limit 200 --oracle-strategy --out /tmp/ev

Writes OUT/predictions.jsonl (context, gold and predicted strategy, reference, hypothesis and
hypothesis_readable, the reply as star-chat shows it),
OUT/scores.json and OUT/scores.md (the paper's rows beside ours); with --oracle-strategy also
OUT/predictions_oracle.jsonl and a row labelled ORACLE. The default OUT is a folder beside the
model: MODEL/../eval-NAME-SPLIT. The data settings (max source/target, situation) default to
those the model was trained with (its train_config.json). Files in OUT are replaced only when
OUT/scores.json is star-eval's own (else it refuses: choose another --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from star_training.checkpoint import load_model, resolve_checkpoint
from star_training.cli_common import (
    DEFAULT_TOKENIZER,
    CliError,
    add_common_args,
    check_own_outputs,
    load_tokenizer,
    nonnegative_int,
    positive_float,
    positive_int,
    resolve_data_path,
    run_cli,
    seed_everything,
)
from star_training.data import SPLITS, build_examples, load_conversations
from star_training.distributed import resolve_device
from star_training.evaluation import DecodingSettings, evaluate
from star_runtime.atomic import write_text_atomically
from star_runtime.terminal import printable
from star_training.report import PAPER_TABLE_2, markdown_table, table_rows
from star_training.run_state import read_train_config

PROG = "star-eval"
PAPER = DecodingSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a star-train run folder (its best/ is used, else last/) or a "
                   "checkpoint folder in one (RUN/best, RUN/last)")
    add_common_args(p)
    p.add_argument("--split", choices=SPLITS, default="test", help="(default: test)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: MODEL/../eval-NAME-SPLIT)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    p.add_argument("--oracle-strategy", action="store_true",
                   help="also generate with the GOLD strategy fed, reported apart and labelled ORACLE")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help=f"tokenizer folder (default: the model folder's, else {DEFAULT_TOKENIZER})")
    data = p.add_argument_group("data (default: as the model was trained, else the paper's)")
    data.add_argument("--max-source", type=positive_int, default=None)
    data.add_argument("--max-target", type=positive_int, default=None)
    data.add_argument("--no-situation", action="store_true")
    dec = p.add_argument_group("decoding (paper defaults)")
    dec.add_argument("--top-p", type=positive_float, default=PAPER.top_p, help=f"(default: {PAPER.top_p})")
    dec.add_argument("--top-k", type=nonnegative_int, default=PAPER.top_k, help=f"0 = off (default: {PAPER.top_k})")
    dec.add_argument("--temperature", type=positive_float, default=PAPER.temperature,
                     help=f"(default: {PAPER.temperature})")
    dec.add_argument("--repetition-penalty", type=positive_float, default=PAPER.repetition_penalty,
                     help=f"(default: {PAPER.repetition_penalty})")
    dec.add_argument("--max-new-tokens", type=nonnegative_int, default=PAPER.max_new_tokens,
                     help=f"(default: {PAPER.max_new_tokens})")
    return p


def _provenance(trained: dict) -> str:
    """Where the model's weights came from, as star-train recorded it."""
    if not trained:
        return "no train_config.json, provenance unknown"
    start = (f"random init, preset {trained['preset']}" if trained.get("preset")
             else f"--init {trained['init']}" if trained.get("init") else f"pretrained {trained.get('base')}")
    return f"star-train stage {trained.get('stage')}, {start}, {trained.get('epochs')} epochs"


OUTPUTS = ("predictions.jsonl", "predictions_oracle.jsonl", "scores.json", "scores.md")


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_p > 1:
        build_parser().error(f"argument --top-p: must be in (0, 1], not {args.top_p}")

    def body() -> int:
        args.model, which = resolve_checkpoint(args.model)
        if which:
            print(f"{PROG}: using {printable(which)}", file=sys.stderr)
        trained = read_train_config(args.model) or {}
        seed = 42 if args.seed is None else args.seed
        seed_everything(seed)
        device = resolve_device(args.device or "auto")
        tok = load_tokenizer(args.tokenizer, args.model)
        model = load_model(args.model, vocab_size=tok.vocab_size)
        settings = DecodingSettings(args.top_p, args.top_k, args.temperature, args.repetition_penalty,
                                    args.max_new_tokens)
        data_settings = {
            "max_source": args.max_source or trained.get("max_source", 160),
            "max_target": args.max_target or trained.get("max_target", 40),
            "use_situation": False if args.no_situation else trained.get("use_situation", True),
        }
        data_path = resolve_data_path(args.data)
        examples = build_examples(load_conversations(data_path, args.split), tok, **data_settings)
        examples = examples[: args.limit]
        if not examples:
            raise CliError(f"{data_path}: the {args.split} split has no supporter turn to score; pass another --split "
                           "or --data")
        out = args.out or args.model.resolve().parent / f"eval-{args.model.resolve().name}-{args.split}"
        check_own_outputs(out, OUTPUTS, "scores.json", {"paper_table_2", "decoding"}, PROG)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"cannot create --out {out}: {e.strerror or e}; choose another --out") from e

        result = evaluate(model, tok, examples, settings=settings, batch_size=args.batch_size, device=device,
                          seed=seed, oracle=args.oracle_strategy)
        label = f"{args.model} ({'STAR' if model.star_config.use_star else 'STAR bypassed'})"
        scores = {
            "model": str(args.model.resolve()), "star": model.star_config.use_star, "split": args.split,
            "data": str(data_path), "seed": seed, "batch_size": args.batch_size, "decoding": asdict(settings),
            "data_settings": data_settings, "trained_from": {k: trained.get(k) for k in ("stage", "preset", "base", "init")},
            **result.scores, "paper_table_2": PAPER_TABLE_2,
        }
        table = markdown_table(table_rows(result.scores, label))
        notes = (
            f"\n{args.split} split, {len(examples)} examples, seed {seed}; decoding top-p {settings.top_p}, "
            f"top-k {settings.top_k}, temperature {settings.temperature}, repetition penalty "
            f"{settings.repetition_penalty}, at most {settings.max_new_tokens} tokens. Strategy and text scores "
            "use the PREDICTED strategy; PPL is teacher-forced with the gold strategy. Paper: pretrained "
            f"BlenderBot-Small on a GPU; ours: {_provenance(trained)}.\n"
        )
        write_text_atomically(out / "predictions.jsonl", _jsonl(result.predictions))
        if args.oracle_strategy:
            write_text_atomically(out / "predictions_oracle.jsonl", _jsonl(result.oracle_predictions))
        write_text_atomically(out / "scores.json", json.dumps(scores, indent=2) + "\n")
        write_text_atomically(out / "scores.md", table + notes)
        print(printable(table + notes + f"\nwritten to {out}", newlines=True))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
