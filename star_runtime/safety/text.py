"""Text as the crisis rules read it: folded, with the evasions people use undone.

    variants(x) -> the normalised readings of x that the rules are matched on:
        plain      normalise(unescaped(x))
        joined     the same after filler symbols inside words are dropped ("k*ll", "ki.ll",
                   "k.i.l.l") and runs of spaced-out letters are joined into words
                   ("s u i c i d e", "k i l l m y s e l f" -> "kill myself")
        reversed   plain of the message read backwards (text typed right to left, or stored
                   reversed behind a bidi override: "flesym llik")
    Each is (out, starts, ends): out[j] stands for x[starts[j]:ends[j]], so a match is reported as
    the user wrote it.

normalise: per character NFKD, drop combining marks and format characters (zero-width space and
joiner, soft hyphen, bidi controls), casefold, map look-alike Cyrillic/Greek letters to Latin;
digits and symbols inside words read as letters ("k1ll", "su1c1de", "$uicide"); apostrophes
dropped ("don't" == "dont"); clause punctuation becomes " . " or " , "; anything else a space;
runs of three or more of a letter squeezed to one ("dieeee" -> "die"; a double stays, so
"noose" and "nose" stay two words). Control
characters (C0/C1) inside a word are dropped, and a terminal escape sequence (CSI, OSC) is cut
out whole, so "l<ESC>[0mife" reads "life". The rules are squeezed the same way when compiled,
and a double letter of a rule word also matches a single one when that spelling is not an English
word ("kil" reads as "kill", "nose" never as "noose").
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

Normalised = tuple[str, list[int], list[int]]

_APOSTROPHES = frozenset("'\u2018\u2019\u201b\u02bc\u02b9`\u00b4\u2032")
_MARKS = {
    **dict.fromkeys(".!?;:\n\r\u2026\u3002\uff01\uff1f", "."),  # clause ends
    **dict.fromkeys(",\u060c\u3001", ","),
}
_CAPITAL_I_AS_L = re.compile(r"(?<=[a-z])I")
# Cyrillic and Greek letters that render like Latin ones ("кill"); the common ones only.
_CONFUSABLES = str.maketrans(
    # Cyrillic а с е о р х у і ј ѕ ԁ к, then Greek α ι κ ν ο τ
    "\u0430\u0441\u0435\u043e\u0440\u0445\u0443\u0456\u0458\u0455\u0501\u043a"
    "\u03b1\u03b9\u03ba\u03bd\u03bf\u03c4",
    "aceopxyijsdkaikvot",
)
# Symbols read as letters when they sit inside a word. "1" is "l" after i/l/a ("ki11", "a11")
# and "i" elsewhere ("k1ll", "su1c1de").
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
_LEET_CHARS = frozenset(_LEET) | {"1"}
# Terminal escape sequences (ECMA-48): CSI "ESC [ params final", OSC "ESC ] ... BEL|ST", the
# 8-bit CSI, and two-character escapes. Cut out whole: their parameters are not text.
_ESCAPES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
# A control character inside a word is dropped ("k\x00ill"); tab and newline separate words.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Filler between two letters of one word: "k*ll", "ki_ll", "k.i.l.l", "k-i-l-l".
_FILLER_IN_WORD = re.compile(r"(?<=[^\W\d_])[*_~|^#=+.\-\u00b7\u2022/\\]+(?=[^\W\d_])")
# Three or more single letters each followed by one space ("s u i c i d e").
_SPACED_RUN = re.compile(r"(?<![^\W\d_])(?:[^\W\d_] ){2,}[^\W\d_](?![^\W\d_])")


def unescaped(text: str) -> str:
    """`text` without terminal escape sequences and with in-word control characters removed."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


@lru_cache(maxsize=8192)
def _fold(ch: str) -> str:
    """One character folded: NFKD, no combining marks or format characters, casefolded."""
    if ch.isascii():
        return ch.lower()
    decomposed = unicodedata.normalize("NFKD", ch)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return kept.casefold().translate(_CONFUSABLES)


def normalise(text: str) -> Normalised:
    """Fold `text` for matching (module docstring).

    Returns (out, starts, ends): out[j] stands for text[starts[j]:ends[j]] (a squeezed run
    stands for all its letters). `out` is lowercase words separated by single spaces, with
    " . " at clause ends and " , " at commas. One pass over the characters; ASCII text (most
    messages) skips the per-character Unicode folding.
    """
    # A capital I inside a lowercase word stands for l ("kiII" reads as "kill"); same length.
    text_l = _CAPITAL_I_AS_L.sub("l", text)
    if text_l.isascii():
        chars: str = text_l.lower()
        where: range | list[int] = range(len(chars))
    else:
        pieces = [_fold(ch) for ch in text_l]
        chars = "".join(pieces)
        if len(chars) == len(text_l):
            where = range(len(chars))
        else:
            where = [i for i, piece in enumerate(pieces) for _ in piece]

    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    last = " "  # last character written to `out` (a space before the first)
    run = 0  # length of the run of `last` in the input
    n = len(chars)
    for j in range(n):
        c = chars[j]
        i = where[j]
        if c in _LEET_CHARS:
            before_letter = j + 1 < n and chars[j + 1].isalpha()
            if last.isalpha():
                if c == "1":
                    c = "l" if last in "ila" else "i"
                elif before_letter or c not in "!$@":  # "die!" stays a clause end
                    c = _LEET.get(c, c)
            elif c in "$@" and before_letter and not last.isalnum():
                c = _LEET[c]  # word-initial: "$uicide", "@ll"
        if c.isalnum():
            if c == last and c.isalpha():
                run += 1
                if run == 3:  # "dieee": the second letter goes, the run reads as one
                    out.pop()
                    starts.pop()
                    end = ends.pop()
                    ends[-1] = end
                if run >= 3:
                    ends[-1] = i + 1
                    continue
            else:
                run = 1
            out.append(c)
        elif c in _APOSTROPHES:
            continue
        elif c in _MARKS:
            mark = _MARKS[c]
            if last != " ":
                out.append(" ")
                starts.append(i)
                ends.append(i + 1)
            if len(out) >= 2 and out[-2] == mark:  # "!!!" -> one mark
                continue
            out.append(mark)
            starts.append(i)
            ends.append(i + 1)
            c = " "
            out.append(c)
        elif last != " ":
            c = " "
            out.append(c)
        else:
            continue
        starts.append(i)
        ends.append(i + 1)
        last = c
    if out and out[-1] == " ":
        out.pop()
        starts.pop()
        ends.pop()
    return "".join(out), starts, ends


def squeeze(word: str) -> str:
    """A run of three or more of one letter as one letter, as `normalise` does ("dieee" -> "die")."""
    return re.sub(r"([a-z])\1{2,}", r"\1", word)


# ---------------------------------------------------------------------------------------------
# English words: the typo corrector leaves them alone, and spaced-out letters are split by them
# ---------------------------------------------------------------------------------------------

WORDS_FILE = "english_words.txt.gz"  # SCOWL (american + british, 75,238 words), see its LICENSE


def _words_text() -> str:
    path = Path(str(resources.files("star_runtime") / "data" / "safety" / WORDS_FILE))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Lowercase English words (SCOWL's american and british lists, no possessives)."""
    return frozenset(_words_text().split())


_RUN_WORDS = re.compile(r"\S*([a-z])\1{2,}\S*")  # words with a run that squeeze shortens


@dataclass(frozen=True)
class WordSet:
    """Membership in `words` or in `extra`, without copying `words` into a table of its own."""

    words: frozenset[str]
    extra: frozenset[str]

    def __contains__(self, word: object) -> bool:
        return word in self.words or word in self.extra


@lru_cache(maxsize=1)
def squeezed_english_words() -> WordSet:
    """english_words() spelt as normalise spells them ("xxiii" -> "xi"), besides the unsqueezed
    spellings (which squeezed text never holds)."""
    # 21 of the 75,238 words have a run of three letters: a set of every squeezed word held
    # 6.2 MB, the union with english_words() 4 MB.
    extra = frozenset(squeeze(m.group(0)) for m in _RUN_WORDS.finditer(_words_text()))
    return WordSet(english_words(), extra)


# Letters that are words alone; a spaced run is read through them but never ends up one of them
# unless nothing else fits.
_ONE_LETTER_WORDS = frozenset("ai")


def segment(letters: str) -> str:
    """`letters` (one word's worth, no spaces) split into the fewest English words.

    Dynamic programming over split points: best[j] = fewest words covering letters[:j];
    O(n * 24) lookups. Unsplittable text is returned as it is.
    """
    words, n = english_words(), len(letters)
    low = letters.lower()
    best: list[tuple[int, int] | None] = [(0, 0)] + [None] * n  # (word count, start of last word)
    for j in range(1, n + 1):
        for i in range(max(0, j - 24), j):
            piece = low[i:j]
            if best[i] is None or not (piece in _ONE_LETTER_WORDS if len(piece) == 1 else piece in words):
                continue
            cost = best[i][0] + (1 if len(piece) > 1 else 2)  # a lone letter costs more
            if best[j] is None or cost < best[j][0]:
                best[j] = (cost, i)
    if best[n] is None:
        return letters
    cuts, j = [], n
    while j > 0:
        i = best[j][1]
        cuts.append(letters[i:j])
        j = i
    return " ".join(reversed(cuts))


def _joined(text: str) -> str:
    """Filler inside words dropped and spaced-out letters joined (the `joined` variant)."""
    text = _FILLER_IN_WORD.sub("", text)
    return _SPACED_RUN.sub(lambda m: segment(m.group().replace(" ", "")), text)


def variants(text: str) -> list[tuple[str, Normalised]]:
    """The readings of `text` the rules are matched on (module docstring), as (name, normalised).

    A reading that equals an earlier one is left out, so plain text costs one pass (plus the
    reversed one).
    """
    clean = unescaped(text)
    out = [("plain", normalise(clean))]
    joined = _joined(clean)
    if joined != clean:
        # Offsets: `joined` shortens the text, so its spans are mapped back to the whole
        # message's extent (the phrase is reported as the whole message's span it came from).
        norm, starts, ends = normalise(joined)
        out.append(("joined", (norm, _coarse(starts, len(joined), len(text)), _coarse(ends, len(joined), len(text)))))
    rev = normalise(clean[::-1])
    # Read backwards only when the backwards text is more English than the forwards one: short
    # words reversed make new ones ("do i" -> "i od"), so reading every message both ways
    # would find crises nobody wrote.
    if rev[0] != out[0][1][0] and _english_share(rev[0]) > _english_share(out[0][1][0]):
        m = len(clean)
        out.append(("reversed", (rev[0], [m - e for e in rev[2]], [m - s for s in rev[1]])))
    return out


def _english_share(norm: str) -> float:
    """Share of the words of a normalised text that are English words (squeezed spelling)."""
    words = [w for w in norm.split(" ") if w.isalpha()]
    if not words:
        return 0.0
    known = squeezed_english_words()
    return sum(w in known for w in words) / len(words)


def _coarse(offsets: list[int], n_from: int, n_to: int) -> list[int]:
    """Offsets into a text of length n_from scaled onto one of length n_to (an approximation)."""
    if n_from == 0:
        return offsets
    return [min(n_to, round(o * n_to / n_from)) for o in offsets]
