"""BlenderBot-Small's token text as a person writes it.

The tokenizer lowercases and splits punctuation off ("i ' m sorry . what ' s wrong ?"); a reply
is shown as

    i ' m -> I'm        an apostrophe between letters joins them (contractions, possessives)
    that . -> that.     no space before . , ! ? ; : % ) or a closing quote, none after ( or an
                        opening quote ("..." pairs alternate); ". . ." -> "..."
    i -> I              the pronoun, alone or in a contraction (I'm, I've, I'd, I'll)
    . what -> . What    a capital at the start and after a sentence end (not after "...")

`readable(text)` is used for every reply a person sees (Conversation, star-chat, star-eval's
"hypothesis_readable"); the metrics keep the tokenizer's text, so scores do not move. Streamed
text goes through it too (safety.stream.ScreenedStream renders the reply so far and passes on
only text no later token can change).
"""

from __future__ import annotations

import re

_JOIN_APOSTROPHE = re.compile(r"(?<=[A-Za-z]) ' (?=[A-Za-z])")
_ELLIPSIS = re.compile(r"\.(?: \.)+")
_SPACE_BEFORE = re.compile(r" +(?=[.,!?;:%)\]])")
_SPACE_AFTER_OPEN = re.compile(r"(?<=[(\[]) +")
_PRONOUN = re.compile(r"(?<![A-Za-z'])i(?=$|[^A-Za-z]|'(?:m|ve|d|ll)\b)")
_SENTENCE_START = re.compile(r"(^|(?<!\.\.)[.!?] +)([a-z])")  # not after "..."


def _quotes(text: str) -> str:
    """Double quotes paired in order: no space after an opening one, none before a closing one."""
    first, *rest = text.split('"')
    out = first
    for k, part in enumerate(rest):
        out = out + '"' + part.lstrip(" ") if k % 2 == 0 else out.rstrip(" ") + '"' + part
    return out


def readable(text: str) -> str:
    """`text` (the tokenizer's decoded text) as written English (module docstring)."""
    text = _JOIN_APOSTROPHE.sub("'", text)
    text = _ELLIPSIS.sub("...", text)
    text = _SPACE_BEFORE.sub("", text)
    text = _SPACE_AFTER_OPEN.sub("", text)
    if '"' in text:
        text = _quotes(text)
    text = _PRONOUN.sub("I", text)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
