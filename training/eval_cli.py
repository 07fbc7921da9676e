"""star-eval: score a saved model on an ESConv split, in the columns of the paper's Table 2.

    star-eval runs/star                                # a run folder: its best/ (else last/)
    star-eval runs/star/best                           # test split, paper decoding, seed 42
    star-eval runs/star/best --limit 200 --oracle-strategy --out /tmp/ev
    star-eval runs/star --responder openai --base-url https://api.openai.com/v1 --model gpt-4o-mini \
        --api-key-env OPENAI_API_KEY --shots 5          # SC+: STAR picks the strategy, the LLM writes
    star-eval --responder openai --classifier none --base-url URL --model NAME --out /tmp/llm
                                                       # the LLM picks the strategy too (no STAR model)

Writes OUT/predictions.jsonl (context, gold and predicted strategy, reference, hypothesis and
hypothesis_readable, the reply as star-chat shows it),
OUT/scores.json and OUT/scores.md (the paper's rows beside ours); with --oracle-strategy also
OUT/predictions_oracle.jsonl and a row labelled ORACLE. The default OUT is a folder beside the
model: MODEL/../eval-NAME-SPLIT. The data settings (max source/target, situation) default to
those the model was trained with (its train_config.json). Files in OUT are replaced only when
OUT/scores.json is star-eval's own (else it refuses: choose another --out).

With --responder openai an LLM behind any OpenAI-compatible endpoint writes the replies
(star_training.llm_responder): from the context, the strategy STAR predicted (its name and
description) and --shots examples of it from the train split; with --classifier none it picks
the strategy itself. The same metrics and table (no PPL: the LLM's probabilities are not read);
the default OUT is MODEL/../eval-NAME-SPLIT-LLM-Kshot. Answers are cached on disk (--cache), so
a rerun or an interrupted run costs only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from star_runtime.tokenizer import Tokenizer
from star_training.checkpoint import load_model, resolve_checkpoint
from star_training.cli_common import (
    DEFAULT_TOKENIZER,
    CliError,
    add_common_args,
    check_own_outputs,
    llm_errors,
    load_tokenizer,
    nonnegative_int,
    positive_float,
    positive_int,
    resolve_data_path,
    run_cli,
    seed_everything,
    slug,
)
from star_training.data import SPLITS, Example, build_examples, load_conversations
from star_training.distributed import resolve_device
from star_runtime.sampling import DecodingOptions
from star_training.evaluation import EvalResult, evaluate, predict_strategies, score_replies
from star_training.llm_client import AnswerProgress, add_llm_args, client_from_args, display_url, settings_from_args
from star_training.llm_responder import ShotSampler, read_replies, reply_requests, train_shots
from star_training.model import StarForConditionalGeneration
from star_runtime.atomic import write_text_atomically
from star_runtime.terminal import printable
from star_training.report import PAPER_TABLE_2, PAPER_TABLE_3, markdown_table, table_rows
from star_training.run_state import read_train_config

PROG = "star-eval"
PAPER = DecodingOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="a star-train run folder (its best/ is used, else last/) or a checkpoint folder in one "
                   "(RUN/best, RUN/last); not given with --classifier none")
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
    llm = p.add_argument_group("an LLM writes the replies (SC+; any OpenAI-compatible endpoint)")
    llm.add_argument("--responder", choices=("star", "openai"), default="star",
                     help="who writes the replies: the STAR model, or the LLM at --base-url (default: star)")
    llm.add_argument("--classifier", choices=("star", "none"), default="star",
                     help="with --responder openai, who picks the strategy: the STAR model (SC+), or none: the "
                     "LLM itself, the baseline (default: star)")
    llm.add_argument("--shots", type=nonnegative_int, default=0,
                     help="examples of the strategy from the train split in each prompt; the paper: 0, 5, 10 "
                     "(default: 0)")
    add_llm_args(llm, required=False, max_tokens=LLM_MAX_TOKENS)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option combinations argparse cannot check alone (exit 2 through p.error)."""
    if args.top_p > 1:
        p.error(f"argument --top-p: must be in (0, 1], not {args.top_p}")
    if args.responder == "star":
        given = [flag for flag, value in (("--base-url", args.base_url), ("--model", args.llm_model),
                                          ("--classifier none", args.classifier == "none"),
                                          ("--shots", args.shots)) if value]
        if given:
            p.error(f"{', '.join(given)} need --responder openai")
        if args.model is None:
            p.error("the following arguments are required: model")
        return
    for flag, value in (("--base-url", args.base_url), ("--model", args.llm_model)):
        if value is None:
            p.error(f"--responder openai needs {flag}")
    if args.shots and args.split == "train":
        p.error("--shots draws its examples from the train split; score --split valid or test")
    if args.oracle_strategy:
        p.error("--oracle-strategy is for --responder star (the LLM is given STAR's strategy, or picks its own)")
    if args.classifier == "none" and args.model is not None:
        p.error(f"--classifier none uses no STAR model; leave out {args.model}, or use --classifier star")
    if args.classifier == "star" and args.model is None:
        p.error("--classifier star needs the STAR model (a run or checkpoint folder) that picks the strategy")
    if args.classifier == "none" and args.out is None:
        p.error("--classifier none needs --out (there is no model folder to write beside)")


def _provenance(trained: dict) -> str:
    """Where the model's weights came from, as star-train recorded it."""
    if not trained:
        return "no train_config.json, provenance unknown"
    start = (f"random init, preset {trained['preset']}" if trained.get("preset")
             else f"--init {trained['init']}" if trained.get("init") else f"pretrained {trained.get('base')}")
    return f"star-train stage {trained.get('stage')}, {start}, {trained.get('epochs')} epochs"


OUTPUTS = ("predictions.jsonl", "predictions_oracle.jsonl", "scores.json", "scores.md")
LLM_MAX_TOKENS = 128  # an ESConv supporter turn is about 20 words; a reply of a few sentences fits


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _default_out(args: argparse.Namespace) -> Path:
    name = f"eval-{args.model.resolve().name}-{args.split}"
    if args.responder == "openai":
        name += f"-{slug(args.llm_model)}-{args.shots}shot"
    return args.model.resolve().parent / name


def _llm_run(args: argparse.Namespace, model: StarForConditionalGeneration | None, tok: Tokenizer,
             examples: list[Example], data_path: Path, seed: int,
             device: torch.device) -> tuple[EvalResult, dict, str, str]:
    """--responder openai: the replies of the LLM, scored as star-eval scores STAR's; returns the
    result, what scores.json records of the run, the table's label and the notes under it."""
    strategies = None if model is None else predict_strategies(model, tok, examples, batch_size=args.batch_size,
                                                                device=device)
    sampler = ShotSampler(train_shots(load_conversations(data_path, "train")) if args.shots else [], seed)
    settings = settings_from_args(args)
    requests = reply_requests(examples, sampler, shots=args.shots, strategies=strategies, settings=settings)
    with llm_errors():
        client = client_from_args(args)
        replies = read_replies(client.complete(requests, AnswerProgress(PROG, client.distinct(requests))), strategies)
    result = score_replies(examples, tok, replies.strategies, replies.replies, detokenize=False)
    run = {
        "decoding": settings,
        "responder": {"kind": "openai", "base_url": display_url(args.base_url), "model": args.llm_model,
                      "classifier": args.classifier, "shots": args.shots, "requests_sent": client.requests_sent,
                      "answers_from_cache": replies.from_cache, "tokens": replies.tokens.as_dict()},
    }
    label = (f"{args.llm_model} SC+, {args.shots}-shot, strategy by STAR" if model is not None
             else f"{args.llm_model}, {args.shots}-shot, strategy by the LLM")
    given = (f"the strategy {args.model} predicted (its name and description) and {args.shots} examples of it"
             if model is not None else f"the 8 strategies with their descriptions and {args.shots} labelled examples")
    tokens = replies.tokens.as_dict()
    notes = (
        f"\n{args.split} split, {len(examples)} examples. Replies written by {args.llm_model} at "
        f"{display_url(args.base_url)} (temperature {settings['temperature']:g}, at most {settings['max_tokens']} "
        f"tokens) from the context, {given} from the train split (drawn with seed {seed})"
        + ("" if model is not None else "; the LLM names the strategy it uses")
        + ". Strategy and text scores use that PREDICTED strategy; no PPL (the LLM's probabilities are not read). "
        "The paper's Table 3 numbers (GPT-4o-mini, with and without STAR) are not in this project's reference "
        "(SPEC.md), so no Table 3 row is shown.\n"
        f"Tokens for these answers: {tokens['prompt']:,} prompt + {tokens['completion']:,} completion = "
        f"{tokens['total']:,}; this run sent {client.requests_sent} requests and took {replies.from_cache} answers "
        "from the cache.\n"
    )
    return result, run, label, notes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    def body() -> int:
        trained: dict = {}
        if args.model is not None:
            args.model, which = resolve_checkpoint(args.model)
            if which:
                print(f"{PROG}: using {printable(which)}", file=sys.stderr)
            trained = read_train_config(args.model) or {}
        seed = 42 if args.seed is None else args.seed
        seed_everything(seed)
        device = resolve_device(args.device or "auto")
        tok = load_tokenizer(args.tokenizer, args.model or DEFAULT_TOKENIZER)
        model = None if args.model is None else load_model(args.model, vocab_size=tok.vocab_size)
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
        out = args.out or _default_out(args)
        check_own_outputs(out, OUTPUTS, "scores.json", {"paper_table_2", "decoding"}, PROG)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"cannot create --out {out}: {e.strerror or e}; choose another --out") from e

        paper = {"paper_table_2": PAPER_TABLE_2}
        if args.responder == "openai":
            result, run, label, notes = _llm_run(args, model, tok, examples, data_path, seed, device)
            paper["paper_table_3"] = PAPER_TABLE_3
        else:
            settings = DecodingOptions(top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
                                       repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)
            result = evaluate(model, tok, examples, options=settings, batch_size=args.batch_size, device=device,
                              seed=seed, oracle=args.oracle_strategy)
            run = {"decoding": asdict(settings)}
            label = f"{args.model} ({'STAR' if model.star_config.use_star else 'STAR bypassed'})"
            notes = (
                f"\n{args.split} split, {len(examples)} examples, seed {seed}; decoding top-p {settings.top_p}, "
                f"top-k {settings.top_k}, temperature {settings.temperature}, repetition penalty "
                f"{settings.repetition_penalty}, at most {settings.max_new_tokens} tokens. Strategy and text scores "
                "use the PREDICTED strategy; PPL is teacher-forced with the gold strategy. Paper: pretrained "
                f"BlenderBot-Small on a GPU; ours: {_provenance(trained)}.\n"
            )
        scores = {
            "model": None if args.model is None else str(args.model.resolve()),
            "star": None if model is None else model.star_config.use_star, "split": args.split,
            "data": str(data_path), "seed": seed, "batch_size": args.batch_size, **run,
            "data_settings": data_settings,
            "trained_from": {k: trained.get(k) for k in ("stage", "preset", "base", "init")},
            **result.scores, **paper,
        }
        table = markdown_table(table_rows(result.scores, label, paper=tuple(paper.values())))
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
