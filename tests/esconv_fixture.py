"""A small ESConv-format split folder the tests write themselves (the real data is licensed).

Each conversation alternates seeker ("usr") and supporter ("sys") turns, as the Hugging Face
split files do; the supporter turns cycle through all 8 strategies, and each strategy has its
own wording, so a model can learn both tasks from a few dozen examples.
"""

from __future__ import annotations

import json
from pathlib import Path

from star_runtime.strategies import STRATEGY_NAMES

SEEKER_LINES = (
    "i feel so stressed about my job lately .",
    "my friends do not call me anymore .",
    "i cannot sleep because of my exams .",
    "my partner left me last week .",
)
SUPPORTER_LINES = {
    "Question": "what happened that made you feel this way ?",
    "Restatement or Paraphrasing": "so you are saying that things feel heavy right now .",
    "Reflection of feelings": "it sounds like you feel very lonely .",
    "Self-disclosure": "i went through something similar last year .",
    "Affirmation and Reassurance": "you are doing the best you can and that is enough .",
    "Providing Suggestions": "maybe you could try a short walk every day .",
    "Information": "many people find that sleep improves with a routine .",
    "Others": "i am glad you reached out today .",
}


def conversation(k: int, turns: int = 6) -> dict:
    dialog = []
    for t in range(turns):
        if t % 2 == 0:
            dialog.append({"text": SEEKER_LINES[(k + t) % len(SEEKER_LINES)], "speaker": "usr"})
        else:
            name = STRATEGY_NAMES[(3 * k + t) % len(STRATEGY_NAMES)]
            dialog.append({"text": SUPPORTER_LINES[name], "speaker": "sys", "strategy": name})
    return {"emotion_type": "anxiety", "problem_type": "job crisis",
            "situation": f"situation number {k} about work and sleep", "dialog": dialog}


def write_esconv(folder: Path, n: int = 6) -> Path:
    """train.txt / valid.txt / test.txt with `n` conversations each (3 supporter turns apiece)."""
    folder.mkdir(parents=True, exist_ok=True)
    for offset, split in enumerate(("train", "valid", "test")):
        lines = [json.dumps(conversation(offset * n + k)) for k in range(n)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder
