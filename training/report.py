"""Score tables in the layout of the paper's Table 2, with the paper's rows beside ours."""

from __future__ import annotations

from typing import Any

# Paper Table 2 (BlenderBot-Small pretrained, GPU), SPEC section 3; None = not reported.
PAPER_TABLE_2: dict[str, dict[str, float | None]] = {
    "BlenderBot-Joint": {"macro_f1": 19.23, "ppl": 16.15, "bleu_2": 5.52, "bleu_4": 1.29, "rouge_l": 15.51,
                         "distinct_1": None, "distinct_2": None},
    "BlenderBot-Joint + STAR": {"macro_f1": 24.81, "ppl": 15.96, "bleu_2": 8.58, "bleu_4": 2.71, "rouge_l": 17.20,
                                "distinct_1": 2.71, "distinct_2": 19.38},
}

COLUMNS = (  # (key, header); the paper reports F1, PPL, B-2, B-4, R-L, D-1, D-2
    ("accuracy", "Acc"), ("macro_f1", "F1"), ("ppl", "PPL"), ("bleu_1", "B-1"), ("bleu_2", "B-2"),
    ("bleu_3", "B-3"), ("bleu_4", "B-4"), ("rouge_l", "R-L"), ("distinct_1", "D-1"), ("distinct_2", "D-2"),
)


def table_rows(scores: dict[str, Any], label: str) -> list[tuple[str, dict[str, float | None]]]:
    """The paper's rows, then ours (predicted strategy), then the oracle run when present."""
    ours = {**scores["predicted"], "ppl": scores["teacher_forced"]["ppl"]}
    rows = [(f"paper: {name}", values) for name, values in PAPER_TABLE_2.items()]
    rows.append((f"ours: {label}", ours))
    if "oracle" in scores:
        rows.append((f"ours: {label}, ORACLE strategy (gold fed; not comparable)", dict(scores["oracle"])))
    return rows


def markdown_table(rows: list[tuple[str, dict[str, float | None]]]) -> str:
    header = "| model | " + " | ".join(h for _, h in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [header, rule]
    for name, values in rows:
        cells = [f"{values[k]:.2f}" if values.get(k) is not None else "" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
