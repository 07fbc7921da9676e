"""Score ONNX bundles on an ESConv split and compare each with the first (the float32 reference).

    python -m star_export.quality --bundle runs/bundles/star-fp32 --bundle runs/bundles/star-int8 \\
        --split test --limit 500 --out runs/quality-star

Every example is decoded GREEDILY by each bundle (`Runtime.generate(do_sample=False)`, with the
first bundle's repetition penalty), so two bundles differ only by their weights' precision, never by
sampling noise. Examples, references and scores are star-eval's (training/evaluation.py): the
encoder input is the example's source ids (at most the manifest's max_source_length tokens, the
length the runtime keeps), the hypothesis is `tokenizer.decode` of the response ids, the
reference is `reference_text`. Scores, x100 (SPEC section 3):

    accuracy, macro_f1        strategy prediction; macro_f1 is Table 2's "F1"
    bleu_1..4, rouge_l        NLTK corpus BLEU (method3) and ROUGE-L (beta 1.2) on word tokens
    distinct_1, distinct_2    unique / all n-grams over the hypotheses
    decode_s, ms_per_token    wall time of all decodes; mean time of one decoder step after the strategy

Against the reference (the first --bundle), per bundle:

    strategy_agreement   % of examples whose predicted strategy equals the reference's
    same_reply           % whose strategy and response token ids are identical to the reference's
    deltas               each score minus the reference's score (0 for the reference itself)

Writes OUT/quality.json (settings, per-bundle precision, folder size, scores, comparison) and
OUT/quality.md (the table it prints). --seed has no effect: decoding is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from star_runtime import Generation, Runtime
from star_runtime.atomic import write_text_atomically
from star_runtime.bundle import load_manifest
from star_runtime.terminal import printable
from star_runtime.tokenizer import Tokenizer
from star_training.cli_common import (CliError, add_common_args, nonnegative_int, positive_int, resolve_data_path,
                                      run_cli)
from star_training.data import build_examples, load_conversations
from star_training.evaluation import reference_text
from star_training.metrics import generation_scores, strategy_scores

PROG = "python -m star_export.quality"
SCORES = ("accuracy", "macro_f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "distinct_1", "distinct_2")
TABLE = (("accuracy", "Acc"), ("macro_f1", "F1"), ("bleu_2", "B-2"), ("bleu_4", "B-4"), ("rouge_l", "R-L"),
         ("distinct_1", "D-1"), ("distinct_2", "D-2"))
DELTAS = ("accuracy", "macro_f1", "bleu_2", "bleu_4", "rouge_l")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", required=True,
                   help="a bundle folder (star-export); repeat it; the first is the reference")
    p.add_argument("--out", type=Path, required=True, help="output folder for quality.json and quality.md")
    add_common_args(p)
    p.add_argument("--split", choices=("valid", "test"), default="test", help="(default: test)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=None,
                   help="response length cap (default: the first bundle's manifest)")
    p.add_argument("--max-target", type=positive_int, default=40,
                   help="reference length in tokens, as training cut it (default: 40, star-eval's)")
    p.add_argument("--no-situation", action="store_true", help="drop the situation from the encoder input")
    p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime threads (default: one per core)")
    return p


def comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """What two bundles must share for their replies to compare token by token."""
    files = manifest["files"]
    return {"tokenizer": [files.get(name, {}).get("sha256") for name in ("vocab.json", "merges.txt")],
            "strategies": manifest["strategies"]["tokens"], "strategy_ids": manifest["strategies"]["token_ids"],
            "special_ids": manifest["special_ids"], "max_source_length": manifest["generation"]["max_source_length"]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compare(ref_runs: list[Generation], ref_scores: dict[str, float], runs: list[Generation],
            scores: dict[str, float]) -> dict[str, Any]:
    """Agreement (% of examples) and score deltas (bundle minus reference) of one bundle's decodes."""
    pairs = list(zip(ref_runs, runs))
    return {"strategy_agreement": 100.0 * sum(a.strategy_id == b.strategy_id for a, b in pairs) / len(pairs),
            "same_reply": 100.0 * sum((a.strategy_id, a.tokens) == (b.strategy_id, b.tokens) for a, b in pairs) / len(pairs),
            "deltas": {k: scores[k] - ref_scores[k] for k in SCORES}}


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["bundle", "precision", "MB", *(h for _, h in TABLE), "ms/token", "agree %", "same reply %",
            *(f"Δ{h}" for k, h in TABLE if k in DELTAS)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        s, c = r["scores"], r["vs_reference"]
        cells = [r["bundle"], r["precision"], f"{r['size_bytes'] / 1e6:.1f}", *(f"{s[k]:.2f}" for k, _ in TABLE),
                 f"{s['ms_per_token']:.2f}", f"{c['strategy_agreement']:.1f}", f"{c['same_reply']:.1f}",
                 *(f"{c['deltas'][k]:+.2f}" for k in DELTAS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        device = "cuda" if args.device == "cuda" else "cpu"  # int8 bundles run on CPU only
        manifests = [load_manifest(b, verify=False) for b in args.bundle]  # fail before decoding anything
        for path, manifest in zip(args.bundle[1:], manifests[1:]):
            if comparable(manifest) != comparable(manifests[0]):
                raise CliError(f"{path}: its vocabulary, strategy labels or source length differ from "
                               f"{args.bundle[0]}'s; their replies cannot be compared")
        generation = manifests[0]["generation"]
        max_new = generation["max_new_tokens"] if args.max_new_tokens is None else args.max_new_tokens
        penalty = generation["repetition_penalty"]  # the reference's, for every bundle
        tok = Tokenizer.from_dir(args.bundle[0])
        data_path = resolve_data_path(args.data)
        data_settings = {"max_source": int(generation["max_source_length"]), "max_target": args.max_target,
                         "use_situation": not args.no_situation}
        examples = build_examples(load_conversations(data_path, args.split), tok, **data_settings)[: args.limit]
        if not examples:
            raise CliError(f"{data_path}: the {args.split} split has no supporter turn to score")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"cannot create --out {args.out}: {e.strerror or e}") from e
        gold, references = [e.strategy for e in examples], [reference_text(e, tok) for e in examples]

        rows, reference = [], None
        for path, manifest in zip(args.bundle, manifests):
            rt = Runtime.load(path, device=device, threads=args.threads)
            runs = [rt.generate(e.input_ids, do_sample=False, max_new_tokens=max_new, repetition_penalty=penalty)
                    for e in examples]
            steps = [ms for g in runs for ms in g.timings.token_ms]
            scores = {**strategy_scores(gold, [g.strategy_id for g in runs]),
                      **generation_scores([rt.tokenizer.decode(g.tokens) for g in runs], references),
                      "decode_s": sum(g.timings.total_ms for g in runs) / 1e3,
                      "ms_per_token": sum(steps) / len(steps) if steps else 0.0}
            reference = reference or (runs, scores)
            rows.append({"bundle": str(path), "precision": manifest["precision"], "size_bytes": folder_bytes(path),
                         "scores": scores, "vs_reference": compare(*reference, runs, scores)})
            del rt  # one bundle's sessions in memory at a time

        settings = {"split": args.split, "data": str(data_path), "examples": len(examples), "device": device,
                    "threads": args.threads, "decoding": f"greedy, repetition penalty {penalty}",
                    "max_new_tokens": max_new, "data_settings": data_settings, "reference": str(args.bundle[0])}
        table = markdown(rows)
        report = {"settings": settings, "bundles": rows}
        write_text_atomically(args.out / "quality.json", json.dumps(report, indent=2) + "\n")
        write_text_atomically(args.out / "quality.md", table)
        notes = (f"\n{args.split} split, {len(examples)} examples, greedy, at most {max_new} tokens; "
                 f"deltas and agreement against {args.bundle[0]}\nwritten to {args.out}")
        print(printable(table + notes, newlines=True))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
