"""Text made safe to print on a terminal: no control characters, no bidi overrides.

A terminal acts on what it is sent: ESC (C0) and CSI/OSC (C1, U+009B/U+009D alone are enough on
many terminals) start sequences that move the cursor, erase lines, set the window title or hide
text, and the Unicode bidi controls reorder what follows them on screen. Strings the programs
print that they did not write themselves -- manifest fields (model_type, strategy labels), model
replies, a user's own words echoed back, file names -- go through `printable` first.

    printable(s)                 drops every C0 (U+0000-U+001F), DEL, C1 (U+0080-U+009F) and bidi
                                 control (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069)
    printable(s, newlines=True)  the same, but keeps "\\n" (a multi-line reply)

Tabs and, without newlines=True, line breaks become one space, so a one-line field stays one
line. Other invisible format characters (zero-width space and joiners, soft hyphen, BOM) are kept:
they cannot move the cursor or reorder text, and U+200D is part of many emoji.

Why the model's replies too: of the 54,944 BlenderBot-Small vocabulary entries, 55 hold a control
or format character (35 with a C0/C1 control or DEL, 20 with a format character, 6 of those a
bidi control); the 41 that carry a control or a bidi control are what this removes.
"""

from __future__ import annotations

import re

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")


def printable(text: object, *, newlines: bool = False) -> str:
    """`text` (any object, through str) without the characters a terminal would act on."""
    cleaned = _UNSAFE.sub("", str(text)).replace("\t", " ")
    return cleaned if newlines else cleaned.replace("\n", " ")
