"""Rules the source keeps that a reader would otherwise have to check by hand."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("star_runtime", "training", "export", "kernels", "benchmarks", "tests")
# Built from two halves so that this file does not match itself.
ISSUE_NUMBER = re.compile("[Ii]ssue" + r" ?#?[0-9]+")


def test_no_source_cites_an_issue_number() -> None:
    # An issue number tells a reader where to look, not why; the comment should say the why.
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in FOLDERS
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_pattern_sees_a_citation() -> None:
    for number in (" 8", " #14", "12"):
        for word in ("see issue", "(Issue"):
            assert ISSUE_NUMBER.search(word + number), word + number
    assert not ISSUE_NUMBER.search("an issue with 8 bits")
