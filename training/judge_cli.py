"""star-judge: score replies with an LLM judge, the Emotional Generation Score (EGS) of the
paper's Table 4, against any OpenAI-compatible endpoint.

    star-judge runs/star/eval-best-test/predictions.jsonl --base-url https://api.openai.com/v1 \\
        --model gpt-4.1-mini --api-key-env OPENAI_API_KEY
    star-judge replies.jsonl --base-url http://127.0.0.1:8080/v1 --model local --out /tmp/judged

Reads star-eval's predictions (the reply is "hypothesis_readable") or any JSON Lines file of
{"context": [...], "reply": "..."} (optional "speakers", "situation", "strategy"). Each reply
is rated on C1 relevance, C2 no negative emotion toward anyone, C3 positive emotion and
support, C4 positive impact, 1-10 each (star_training.judge). Writes OUT/judgments.jsonl (each
answer and its scores), OUT/judge.json and OUT/judge.md: per criterion and EGS the mean with a
95% interval, over all replies and per strategy. The default OUT is a folder beside the input:
judge-NAME-MODEL.

Every answer is cached on disk (--cache) as it arrives: a rerun makes no request, and an
interrupted or failed run, rerun, asks only for what it lacks. When more than --max-unparsed
of the answers are not the criteria's JSON, nothing is reported: the command says how many and
shows one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from star_runtime.atomic import write_text_atomically
from star_runtime.cli import add_version
from star_runtime.terminal import printable
from star_training.cli_common import (
    CliError,
    Failure,
    check_own_outputs,
    llm_errors,
    positive_int,
    run_cli,
    slug,
)
from star_training.judge import (
    COLUMNS,
    CRITERIA,
    EGS,
    PROMPT_SHA256,
    JudgeInputError,
    Judgment,
    by_strategy,
    cell,
    judge_request,
    judgment,
    read_items,
    summary,
)
from star_training.llm_client import (
    AnswerProgress,
    TokenCount,
    add_llm_args,
    client_from_args,
    display_url,
    settings_from_args,
)
from star_training.report import PAPER_TABLE_4, markdown_table, paper_rows

PROG = "star-judge"
OUTPUTS = ("judgments.jsonl", "judge.json", "judge.md")
JUDGE_MAX_TOKENS = 100  # the JSON answer is about 30 tokens; room for a model that adds a word or two


def unparsed_share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", type=Path,
                   help="star-eval's predictions.jsonl, or a JSON Lines file of context + reply")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside the input, judge-NAME-MODEL)")
    p.add_argument("--reply-field", default=None, metavar="FIELD",
                   help="the field holding the reply (default: the first of hypothesis_readable, hypothesis, "
                        "reply, response); e.g. reference, to judge the human replies")
    p.add_argument("--limit", type=positive_int, default=None, help="judge only the first N records")
    p.add_argument("--max-unparsed", type=unparsed_share, default=0.05,
                   help="the largest share of answers that may fail to parse for a report to be made (default: 0.05)")
    add_llm_args(p.add_argument_group("the judge (an OpenAI-compatible endpoint)"), required=True,
                 max_tokens=JUDGE_MAX_TOKENS)
    add_version(p)
    return p


def _record(j: Judgment) -> dict:
    return {"line": j.item.line, "strategy": j.item.strategy, "reply": j.item.reply, "scores": j.scores,
            EGS: j.egs, "answer": j.answer, "error": j.error}


def _notes(report: dict) -> str:
    tokens, run = report["tokens"]["all_answers"], report["tokens"]["this_run"]
    unreported = (f"; {tokens['answers_without_usage']} answers came without a token count"
                  if tokens["answers_without_usage"] else "")
    paper = ("" if PAPER_TABLE_4 else " The paper's Table 4 numbers (judges GPT-4.1-mini and GPT-3.5-turbo) are not in "
             "this project's reference (SPEC.md), so no paper row is shown.")
    return (
        f"\n{report['items']} replies from {report['predictions']}, judged by {report['judge_model']}; "
        f"{report['parsed']} answers parsed, {report['unparsed']} did not (left out of the means). Cells: mean ± "
        "half-width of the 95% t-interval, scale 1-10; EGS = mean of C1-C4 per reply. The prompt is a "
        f"reconstruction from the paper's criteria (sha256 {PROMPT_SHA256[:12]}).{paper}\n"
        f"Tokens for these answers: {tokens['prompt']:,} prompt + {tokens['completion']:,} completion = "
        f"{tokens['total']:,}{unreported}; this run sent {report['requests_sent']} requests "
        f"({run['total']:,} tokens) and took {report['answers_from_cache']} answers from the cache.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            items = read_items(args.predictions, args.reply_field)
        except JudgeInputError as exc:
            raise CliError(str(exc)) from None
        items = items[: args.limit]
        name = f"judge-{slug(args.predictions.stem)}-{slug(args.llm_model)}"
        out = args.out or args.predictions.resolve().parent / name
        check_own_outputs(out, OUTPUTS, "judge.json", {"judge_model", "criteria"}, PROG)
        settings = settings_from_args(args)
        requests = [judge_request(item, **settings) for item in items]

        with llm_errors():
            client = client_from_args(args)
            progress = AnswerProgress(PROG, client.distinct(requests))
            answers = client.complete(requests, progress)
        tokens = TokenCount.of(answers)

        judgments = [judgment(item, answer.text) for item, answer in zip(items, answers)]
        failed = [j for j in judgments if j.scores is None]
        if len(failed) > args.max_unparsed * len(judgments) or len(failed) == len(judgments):
            example = failed[0]
            raise Failure(
                f"{len(failed)} of {len(judgments)} answers ({100 * len(failed) / len(judgments):.1f}%) are not the "
                f"criteria's JSON, more than --max-unparsed {args.max_unparsed:g} allows, so no score is reported. "
                f"One of them (line {example.item.line}: {example.error}): {json.dumps(example.answer[:300])}. "
                "The answers are cached: try another --model, or raise --max-unparsed to report the rest"
            )
        report = {
            "predictions": str(args.predictions.resolve()), "judge_model": args.llm_model,
            "base_url": display_url(args.base_url), "prompt_sha256": PROMPT_SHA256, "criteria": CRITERIA,
            "settings": settings, "items": len(items), "parsed": len(items) - len(failed), "unparsed": len(failed),
            "interval": "95% Student t: mean +- t(0.975, n-1) s / sqrt(n)",
            "scores": summary(judgments), "by_strategy": by_strategy(judgments),
            "tokens": {"all_answers": tokens.as_dict(), "this_run": progress.fresh.as_dict()},
            "requests_sent": client.requests_sent, "answers_from_cache": progress.cached,
            "paper_table_4": PAPER_TABLE_4,
        }
        columns = (*COLUMNS, ("n", "n"))
        ours = (f"ours: judge {args.llm_model}", {**report["scores"], "n": report["parsed"]})
        rows = [*paper_rows(PAPER_TABLE_4), ours]
        table = markdown_table(rows, columns, first="replies", cell=cell)
        strategies = markdown_table([(s, {**t, "n": t[EGS]["n"]}) for s, t in report["by_strategy"].items()],
                                    columns, first="strategy", cell=cell) if report["by_strategy"] else ""
        text = table + _notes(report) + (f"\nPer strategy (the strategy each reply was written with):\n\n{strategies}"
                                         if strategies else "")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"cannot create --out {out}: {e.strerror or e}; choose another --out") from e
        write_text_atomically(out / "judgments.jsonl",
                              "".join(json.dumps(_record(j), ensure_ascii=False) + "\n" for j in judgments))
        write_text_atomically(out / "judge.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text_atomically(out / "judge.md", text)
        print(printable(text + f"\nwritten to {out}", newlines=True))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
