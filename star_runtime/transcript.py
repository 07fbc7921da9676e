"""A star-chat session as data: its conversations, their turns, and an atomic JSON save.

One record shape serves both the saved transcript and star-chat's non-interactive output, so a
script reading either sees the same keys:

    {"reply": str, "strategy": str | null, "strategy_probs": {label: p}, "escalated": bool,
     "escalation": {"trigger", "category", "signal"} | null, "timings": {name: ms or count}}

(strategy null and strategy_probs empty: the safety layer answered and the model did not run.
escalation: what triggered it (user_message, situation, model_reply or history), the category whose
resources were given, and the rules section that matched; the matched words are left out.)

A transcript file (written only on `/save FILE`):

    {"format": 1, "model": str, "device": str,
     "conversations": [{"situation": str | null, "seed": int | null,
                        "turns": [{"user": str, **record}, ...]}, ...]}

`/reset` and `/situation` start a new entry in "conversations", so nothing said earlier in the
session is lost from the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from star_runtime.atomic import write_text_atomically
from star_runtime.conversation import Reply

TRANSCRIPT_FORMAT = 1


def reply_record(reply: Reply) -> dict[str, Any]:
    """The JSON-ready fields of a runtime `Reply` (see the module docstring for the keys)."""
    return {
        "reply": reply.text,
        "strategy": reply.strategy,
        "strategy_probs": {label: float(p) for label, p in reply.strategy_probs.items()},
        "escalated": bool(reply.escalated),
        "escalation": None if reply.escalation is None else {
            "trigger": reply.escalation.trigger, "category": reply.escalation.category,
            "signal": reply.escalation.signal},
        "timings": reply.timings.as_dict(),
    }


@dataclass
class Transcript:
    """Everything said in one star-chat session, grouped by conversation."""

    model: str
    device: str
    conversations: list[dict[str, Any]] = field(default_factory=list)

    def new_conversation(self, situation: str | None, seed: int | None) -> None:
        self.conversations.append({"situation": situation, "seed": seed, "turns": []})

    def add_turn(self, user: str, reply: Reply) -> None:
        if not self.conversations:
            self.new_conversation(None, None)
        self.conversations[-1]["turns"].append({"user": user, **reply_record(reply)})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TRANSCRIPT_FORMAT,
            "model": self.model,
            "device": self.device,
            # A /reset right after another leaves an empty conversation: not worth a file entry.
            "conversations": [c for c in self.conversations if c["turns"]],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the transcript as UTF-8 JSON to `path` atomically (temp file, then os.replace).

        Raises OSError (missing folder, no permission, path is a folder) and leaves `path` as it was.
        """
        path = Path(path).expanduser()
        # Mode 0600: a transcript is what a person said about their mental health, readable by its
        # owner only. fsync'ed: the person asked for it to be kept.
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        write_text_atomically(path, text, private=True, durable=True)
        return path
