"""Written conversations sent to several bundles, side by side: the replies a person would read.

    python benchmarks/conversations.py --bundle old=star_runtime/data/default_bundle \
        --bundle new=bundles/star-pt-int8 --bundle control=bundles/joint-pt-control-int8 --out replies.md

(docs/conversations.md is a written reading followed by that file.)

benchmarks/conversations.json holds the conversations: written for this comparison (not taken
from ESConv) and fixed before any of the compared models replied to them. Each bundle holds each
conversation twice, greedy and sampled (the bundle's decoding, seed 42), with its own replies in
its own history, as star-chat would; the safety layer runs as it does for a person, so a turn in
crisis gets the crisis reply. The markdown lists, per user turn, every bundle's two replies with
the strategy it chose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from star_runtime import BundleError, Reply, Runtime
from star_runtime.atomic import write_text_atomically
from star_runtime.cli import EXIT_USAGE

CONVERSATIONS = Path(__file__).with_name("conversations.json")
SEED = 42


def _shown(reply: Reply) -> str:
    # The crisis reply's text (the policy's, docs/safety.md) is the same for every model.
    if reply.escalated:
        return f"*the crisis reply* (safety layer: {reply.escalation.category}, {reply.escalation.trigger})"
    return f"{reply.text} ({reply.strategy})"


def replies(rt: Runtime, conversation: dict, *, greedy: bool) -> list[str]:
    """Each user turn's reply as shown: "text (Strategy)", or which crisis reply the safety layer gave."""
    conv = rt.conversation(conversation["situation"], SEED, do_sample=False if greedy else None)
    if conv.situation_reply() is not None:
        raise ValueError(f"{conversation['title']}: the situation itself is a crisis; write another")
    return [_shown(conv.reply(turn)) for turn in conversation["turns"]]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " <br> ")


def markdown(conversations: list[dict], results: dict[str, dict[str, list[list[str]]]]) -> str:
    """results[bundle name]["greedy" | "sampled"][conversation] -> replies, one per turn."""
    lines = []
    for k, conversation in enumerate(conversations):
        lines += [f"### {k + 1}. {conversation['title']}", ""]
        if conversation["situation"]:
            lines += [f"Situation: *{conversation['situation']}*", ""]
        for t, turn in enumerate(conversation["turns"]):
            lines += [f"**Person:** {turn}", "", "| model | greedy | sampled |", "|---|---|---|"]
            for name, modes in results.items():
                lines.append(f"| {name} | {_cell(modes['greedy'][k][t])} | {_cell(modes['sampled'][k][t])} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", required=True, metavar="NAME=FOLDER",
                   help="a bundle to compare, by the name its column gets (repeat)")
    p.add_argument("--conversations", type=Path, default=CONVERSATIONS)
    p.add_argument("--out", type=Path, required=True, help="the markdown file to write")
    args = p.parse_args(argv)
    conversations = json.loads(args.conversations.read_text(encoding="utf-8"))
    results: dict[str, dict[str, list[list[str]]]] = {}
    for spec in args.bundle:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            p.error(f"--bundle takes NAME=FOLDER, not {spec!r}")
        try:
            rt = Runtime.load(folder)
        except (BundleError, OSError) as err:
            print(f"conversations.py: {err}", file=sys.stderr)
            return EXIT_USAGE
        results[name] = {mode: [replies(rt, c, greedy=mode == "greedy") for c in conversations]
                         for mode in ("greedy", "sampled")}
    write_text_atomically(args.out, markdown(conversations, results) + "\n")
    print(f"wrote {args.out}: {len(conversations)} conversations x {len(results)} bundles x greedy and sampled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
