"""Score tables in the layout of the paper's tables, with the paper's rows beside ours."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Paper Table 2 (BlenderBot-Small pretrained, GPU), SPEC section 3; None = not reported.
PAPER_TABLE_2: dict[str, dict[str, float | None]] = {
    "BlenderBot-Joint": {"macro_f1": 19.23, "ppl": 16.15, "bleu_2": 5.52, "bleu_4": 1.29, "rouge_l": 15.51,
                         "distinct_1": None, "distinct_2": None},
    "BlenderBot-Joint + STAR": {"macro_f1": 24.81, "ppl": 15.96, "bleu_2": 8.58, "bleu_4": 2.71, "rouge_l": 17.20,
                                "distinct_1": 2.71, "distinct_2": 19.38},
}

# Paper Table 3 (GPT-4o-mini writing the reply, with and without STAR choosing the strategy, 0-,
# 5- and 10-shot; columns of COLUMNS) and Table 4 (the LLM judge's criteria C1-C4 and EGS; keys of
# star_training.judge.CRITERIA and "egs"). Their numbers are not in SPEC.md, the project's
# reference for the paper, so none is copied here and no row is printed; a row added here
# ({"row name": {key: value}}) is printed beside ours.
PAPER_TABLE_3: dict[str, dict[str, float | None]] = {}
PAPER_TABLE_4: dict[str, dict[str, float | None]] = {}

COLUMNS = (  # (key, header); the paper reports F1, PPL, B-2, B-4, R-L, D-1, D-2
    ("accuracy", "Acc"), ("macro_f1", "F1"), ("ppl", "PPL"), ("bleu_1", "B-1"), ("bleu_2", "B-2"),
    ("bleu_3", "B-3"), ("bleu_4", "B-4"), ("rouge_l", "R-L"), ("distinct_1", "D-1"), ("distinct_2", "D-2"),
)

Row = tuple[str, dict[str, Any]]


def paper_rows(*tables: dict[str, dict[str, float | None]]) -> list[Row]:
    """The rows of the paper's tables, each labelled "paper: NAME"."""
    return [(f"paper: {name}", values) for table in tables for name, values in table.items()]


def table_rows(scores: dict[str, Any], label: str,
               paper: Sequence[dict[str, dict[str, float | None]]] = (PAPER_TABLE_2,)) -> list[Row]:
    """The paper's rows, then ours (predicted strategy), then the oracle run when present.

    Replies that were not the model's own (an LLM's) have no teacher-forced PPL: that cell is empty."""
    ours = {**scores["predicted"], "ppl": scores.get("teacher_forced", {}).get("ppl")}
    rows = paper_rows(*paper)
    rows.append((f"ours: {label}", ours))
    if "oracle" in scores:
        rows.append((f"ours: {label}, ORACLE strategy (gold fed; not comparable)", dict(scores["oracle"])))
    return rows


def _two_decimals(value: Any) -> str:
    return f"{value:.2f}"


def markdown_table(rows: list[Row], columns: Sequence[tuple[str, str]] = COLUMNS, *, first: str = "model",
                   cell: Callable[[Any], str] = _two_decimals) -> str:
    """One markdown table: a row per (name, values), a column per (key, header); a missing or None
    value is an empty cell, any other goes through `cell`."""
    header = f"| {first} | " + " | ".join(h for _, h in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [header, rule]
    for name, values in rows:
        cells = [cell(values[k]) if values.get(k) is not None else "" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
