"""Misspelt key words read as the word meant: "sucide" -> "suicide", "myslef" -> "myself".

A word of the message is corrected to a key word of the rules (every literal word they use,
with its common inflections) when

    it is not an English word (SCOWL's lists; "skill" and "will" are never read as "kill"),
    it is at least 5 letters long (squeezed), and
    its Damerau-Levenshtein distance to the key word is at most 1, or 2 for key words of 8
    letters or more ("overdsoed" -> "overdosed")

Shorter words have too many one-edit neighbours to correct safely ("kil" has 30 among English
words). Candidates come from a deletion index (SymSpell's idea): every key word is filed under
each string one or two deletions away from it, so a word is compared only with the key words that
share such a string, not with all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import combinations

from star_runtime.safety.text import Normalised, squeeze, squeezed_english_words

MIN_LENGTH = 5
LONG_WORD = 8  # from here on two edits are allowed
MAX_LENGTH = 24  # longer "words" are not misspelt key words (the longest key word has 15 letters)


def max_edits(word: str) -> int:
    return 2 if len(word) >= LONG_WORD else 1


def distance(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein distance (optimal string alignment) of a and b, capped at limit + 1."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _deletions(word: str, n: int) -> set[str]:
    out = {word}
    for k in range(1, n + 1):
        out.update("".join(c for i, c in enumerate(word) if i not in drop)
                   for drop in combinations(range(len(word)), k))
    return out


class Corrector:
    """Reads misspelt key words as the key word (module docstring)."""

    def __init__(self, keywords: Iterable[str]) -> None:
        self._english = squeezed_english_words()
        self.keywords = frozenset(k for k in (squeeze(w) for w in keywords) if len(k) >= MIN_LENGTH)
        index: dict[str, set[str]] = {}
        for k in self.keywords:
            for d in _deletions(k, max_edits(k)):
                index.setdefault(d, set()).add(k)
        # Tuples, not sets: the index's 23k entries held 5.8 MB as sets.
        self._index: dict[str, tuple[str, ...]] = {d: tuple(sorted(ks)) for d, ks in index.items()}
        self.word = lru_cache(maxsize=65536)(self._word)

    def _word(self, word: str) -> str:
        if (not MIN_LENGTH <= len(word) <= MAX_LENGTH or word in self._english or word in self.keywords
                or not word.isalpha()):
            return word
        candidates: set[str] = set()
        for d in _deletions(word, 2 if len(word) >= LONG_WORD - 1 else 1):
            candidates.update(self._index.get(d, ()))
        best, best_d = word, 3
        for k in sorted(candidates):
            d = distance(word, k, max_edits(k))
            if d <= max_edits(k) and d < best_d:
                best, best_d = k, d
        return best

    def correct(self, norm: Normalised) -> Normalised:
        """`norm` with every misspelt key word replaced; each new letter maps to the old word."""
        text, starts, ends = norm
        words = text.split(" ")
        fixed = [self.word(w) for w in words]
        if fixed == words:
            return norm
        out, new_starts, new_ends, pos = [], [], [], 0
        for k, (old, new) in enumerate(zip(words, fixed)):
            if k:
                out.append(" ")
                new_starts.append(starts[pos - 1])
                new_ends.append(ends[pos - 1])
            lo, hi = starts[pos], ends[pos + len(old) - 1]
            out.append(new)
            if new == old:
                new_starts.extend(starts[pos:pos + len(old)])
                new_ends.extend(ends[pos:pos + len(old)])
            else:
                new_starts.extend([lo] * len(new))
                new_ends.extend([hi] * len(new))
            pos += len(old) + 1
        return "".join(out), new_starts, new_ends
