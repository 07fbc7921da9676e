"""How often the crisis detector escalates ordinary emotional-support conversation.

    python benchmarks/safety_conversations.py [--data ../shared/data/esconv] [--split valid] [--show 40]

Runs the user-message check (rules, then the semantic screen) on every seeker message of one
ESConv split: people talking about a hard time to a supporter, almost always without a crisis.
Prints how many escalate, by category and by signal, and the escalated messages themselves (the
licensed text is printed, never written into the repository), so a reader can tell the false
alarms from the real crises among them. The held-out sets in tests/data measure recall on crisis
messages written one at a time; this measures what a person in an ordinary conversation meets.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from star_runtime.cli import EXIT_USAGE
from star_runtime.safety import detect_crisis
from star_training.cli_common import DEFAULT_DATA
from star_training.data import SEEKER, DataError, load_conversations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    p.add_argument("--show", type=int, default=40, help="escalated messages to print (default 40)")
    args = p.parse_args(argv)
    try:
        conversations = load_conversations(args.data, args.split)
    except DataError as err:
        print(f"safety_conversations: {err}", file=sys.stderr)
        return EXIT_USAGE
    messages = [t.text for c in conversations for t in c.turns if t.speaker == SEEKER]
    t0 = time.perf_counter()
    verdicts = [detect_crisis(m) for m in messages]
    seconds = time.perf_counter() - t0
    hits = [(m, v) for m, v in zip(messages, verdicts) if v.escalate]
    print(f"{args.split}: {len(hits)} of {len(messages):,} seeker messages escalate "
          f"({100 * len(hits) / len(messages):.2f}%), in {len(conversations)} conversations; "
          f"{1000 * seconds / len(messages):.1f} ms a message")
    print("by category:", dict(Counter(v.category for _, v in hits).most_common()))
    print("by signal:", dict(Counter("semantic" if v.signal == "semantic" else "rules" for _, v in hits)))
    for m, v in hits[: args.show]:
        print(f"  [{v.category}/{v.signal}] {m[:160]!r} <- {v.matched[:60]!r} ({v.rule})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
