"""A conversation as the text an LLM reads (star-judge's prompt, star-eval's LLM responder):

    Situation: <the seeker's situation, when known>
    Help-seeker: <utterance>
    Supporter: <utterance>
    ...

one line per utterance, oldest first. Without speakers (a file that records none) each line is
"- <utterance>", so the reader is not told a turn order that may be wrong: ESConv has runs of
several turns by one speaker.
"""

from __future__ import annotations

from collections.abc import Sequence

from star_training.data import SEEKER, SUPPORTER

SPEAKER_LABELS = {SEEKER: "Help-seeker", SUPPORTER: "Supporter"}


def speaker_label(speaker: str) -> str:
    """"Help-seeker" / "Supporter" for ESConv's speakers, any other name as given."""
    return SPEAKER_LABELS.get(speaker, speaker)


def dialogue_text(context: Sequence[str], speakers: Sequence[str] = (), situation: str = "") -> str:
    """The lines of the module docstring; `speakers` is used only when it names every utterance."""
    lines = [f"Situation: {' '.join(situation.split())}"] if situation.strip() else []
    labelled = len(speakers) == len(context) and len(context) > 0
    for k, utterance in enumerate(context):
        lines.append(f"{speaker_label(speakers[k])}: {utterance}" if labelled else f"- {utterance}")
    return "\n".join(lines)
