"""The crisis rules as data: one plain-text file per category, read and compiled here.

A rules file (star_runtime/data/safety/*.rules) is a list of phrases under section headers:

    # a comment
    [intent]                         a section: the signal a match stands for (what a
                                     screener would ask about), reported in the verdict
    going to kill* {SELF}            a phrase: one rule per line
    [benign]                         spans where the words mean something else; a match of
    kill* {SELF} laughing            any section that overlaps one is dropped

A phrase is a sequence of words, matched against the normalised message (lowercase words and
" . "/" , " marks, star_runtime.safety.text), word for word:

    word         that word ("to" also matches "2"; a double letter also matches a single one
                 unless that spelling is an English word: "kill" matches "kil", "noose" not "nose")
    word*        a word starting so ("kill*": kill, kills, killed, killing, killer)
    a|b|c        one of these words
    (a b|c)      one of these phrases
    x?           x or nothing (x: a word, a|b, a group or a {SLOT})
    {SLOT}       one of the phrases the lexicon file gives for SLOT
    ~N           up to N other words (never across a clause mark)
    ~N!{SLOT}    up to N other words, none of them one of SLOT's ("you should ~4!{TURN} hurt")
    {COUNT10}    a number from 10 to 9999 written in digits (a built-in slot)
    a && b       both phrases, anywhere in the message, in either order (each one within a
                 clause): for signs that a person gives across sentences, such as letters
                 written and "then it's done"; the match reported is the first phrase
    $            the end of a clause: a mark or the end of the message follows
    ^            the start of a clause: the message starts here or a mark precedes

`lexicon.rules` defines the slots (`SLOT = phrase | phrase | ...`, one per line; a slot may use
slots defined above it) and the negations: the slots NEGATION (a denial right before a match
cancels it: "I would never ...") and NEGATION_FILLER (words that may sit between the denial and
the match: "never ever really"). Every quantifier is bounded, so a 100 kB message is matched in
linear time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from star_runtime.safety.text import english_words, squeeze

BENIGN = "benign"
CLAUSE_START = r"(?:^|(?<=[.,] ))"
CLAUSE_END = r"(?= [.,]|$)"
WORD = r"[a-z0-9]{1,24}"
# Slots every lexicon has: COUNT10, a number from 10 to 9999 written in digits.
BUILTIN_SLOTS = {"COUNT10": r"[1-9][0-9]{1,3}"}
_SLOT_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+)$")
_SECTION = re.compile(r"^\[([a-z][a-z0-9_]*)\]$")


class RuleError(ValueError):
    """A rules file that cannot be compiled; the message names the file, the line and why."""


@dataclass(frozen=True)
class Rule:
    """One compiled rule: its section (the signal), its source line, its regex, and the regexes
    of its other parts ("a && b": b must also occur somewhere in the message)."""

    signal: str
    source: str
    where: str  # "file:line", for reviews and error messages
    pattern: re.Pattern[str]
    also: tuple[re.Pattern[str], ...] = ()


def data_dir() -> Path:
    """The built-in rules folder, star_runtime/data/safety/."""
    return Path(str(resources.files("star_runtime") / "data" / "safety"))


# ---------------------------------------------------------------------------------------------
# The phrase language -> regular expressions
# ---------------------------------------------------------------------------------------------


def _literal(word: str) -> str:
    if word == "to":
        return "(?:to|2)"
    if not re.fullmatch(r"[a-z0-9]+\*?", word):
        raise ValueError(f"{word!r} is not a lowercase word (letters and digits, optionally ending in *)")
    stem = squeeze(word.rstrip("*"))  # as the text is
    english = english_words()
    # A double letter may be typed or squeezed as one ("kil myself"), except where the single
    # spelling is another English word: "nose" is not "noose", "shot" not "shoot", "son" not "soon".
    parts, k = [], 0
    for m in re.finditer(r"([a-z])\1", stem):
        single = stem[: m.start()] + m.group(1) + stem[m.end():]
        optional = word.endswith("*") or single not in english
        parts += [stem[k : m.start()], m.group(1) + m.group(1) + ("?" if optional else "")]
        k = m.end()
    parts.append(stem[k:])
    return "".join(parts) + (r"[a-z0-9]{0,24}" if word.endswith("*") else "")


class _Parser:
    """Recursive descent over one phrase: alt := seq ('|' seq)*; seq := item+; item := atom '?'?"""

    def __init__(self, text: str, slots: dict[str, str]) -> None:
        self.tokens = re.findall(r"\(|\)|\||\?|\{[A-Z][A-Z0-9_]*\}|~\d+(?:!\{[A-Z][A-Z0-9_]*\})?|\$|\^|[^\s()|?{}~$^]+", text)
        if "".join(self.tokens) != re.sub(r"\s+", "", text):
            raise ValueError("unexpected characters (allowed: words, * ( ) | ? {SLOT} ~N $ ^)")
        self.pos, self.slots = 0, slots

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ValueError("the phrase ends too early")
        self.pos += 1
        return token

    def parse(self) -> str:
        out = self.alternatives()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")
        return out

    def alternatives(self, in_group: bool = False) -> str:
        options = [self.sequence()]
        while self.peek() == "|":
            self.take()
            options.append(self.sequence())
        if CLAUSE_END not in options:
            return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"
        # "(now|$)": the other choices come after a space, the clause end right here. The group
        # then carries its own space (see item).
        if not in_group or len(options) == 1:
            raise ValueError("'$' alone is not a phrase; use it after a word or as one choice of a group")
        rest = [o for o in options if o != CLAUSE_END]
        return f"(?: (?:{'|'.join(rest)})|{CLAUSE_END})"

    def sequence(self) -> str:
        items: list[tuple[str, bool, bool]] = []  # (regex, optional, glued: no space before it)
        while self.peek() not in (None, "|", ")"):
            items.append(self.item())
        if not items:
            raise ValueError("an empty phrase or alternative")
        return _join(items)

    def item(self) -> tuple[str, bool, bool]:
        token = self.take()
        if token == "(":
            regex = self.alternatives(in_group=True)
            if self.peek() != ")":
                raise ValueError("a '(' without its ')'")
            self.take()
            if regex.endswith(f"|{CLAUSE_END})"):  # a group with "$" holds its own space
                optional = self.peek() == "?"
                if optional:
                    self.take()
                return regex, optional, True
        elif token.startswith("{"):
            name = token[1:-1]
            if name not in self.slots:
                raise ValueError(f"unknown slot {token} (the lexicon defines {sorted(self.slots)})")
            regex = self.slots[name]
        elif token.startswith("~"):
            count, _, exclude = token[1:].partition("!")
            n = int(count)
            if not 1 <= n <= 8:
                raise ValueError(f"{token}: a gap is 1 to 8 words")
            if not exclude:
                return f"(?: {WORD}){{0,{n}}}", False, True
            name = exclude[1:-1]
            if name not in self.slots:
                raise ValueError(f"unknown slot {exclude}")
            return f"(?: (?!(?:{self.slots[name]})(?![a-z0-9])){WORD}){{0,{n}}}", False, True
        elif token == "$":
            return CLAUSE_END, False, True
        elif token == "^":
            return CLAUSE_START, False, True
        elif token in (")", "|", "?"):
            raise ValueError(f"unexpected {token!r}")
        else:
            regex = _literal(token)
        optional = self.peek() == "?"
        if optional:
            self.take()
        return regex, optional, False


def _join(items: list[tuple[str, bool, bool]]) -> str:
    """Items joined by single spaces; an optional item carries its space inside its group."""
    first, *rest = items
    if first[0] == CLAUSE_START and rest:  # "^ x? y": the anchor, then the phrase from x on
        return CLAUSE_START + _join(rest)
    if first[1]:  # optional first item: the phrase with it, or the phrase from the next item on
        with_it = _join([(first[0], False, first[2]), *rest]) if rest else first[0]
        without = _join(rest) if rest else ""
        return f"(?:{with_it}|{without})" if without else f"(?:{with_it})"
    out = first[0]
    for regex, optional, glued in rest:
        piece = regex if glued else f" {regex}"
        out += f"(?:{piece})?" if optional else piece
    return out


def compile_phrase(text: str, slots: dict[str, str]) -> str:
    """The regex (over normalised text) of one phrase of the rule language (module docstring)."""
    return _Parser(_group_word_choices(text.strip()), slots).parse()


def _group_word_choices(text: str) -> str:
    """Outside parentheses, "a|b|c" (no spaces) is a choice of one word: written as "(a|b|c)".
    Inside them "|" separates whole phrases."""
    out, depth, k = [], 0, 0
    while k < len(text):
        c = text[k]
        if c in "()":
            depth += 1 if c == "(" else -1
        elif depth == 0 and (m := re.compile(r"[a-z0-9*]+(?:\|[a-z0-9*]+)+").match(text, k)) and (
                k == 0 or text[k - 1] in " "):
            out.append(f"({m.group()})")
            k = m.end()
            continue
        out.append(c)
        k += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RuleError(f"rules file {path}: cannot be read ({err})") from None
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((n, line))
    return out


def load_lexicon(path: Path) -> dict[str, str]:
    """Slot name -> regex, in file order (a slot may use the slots above it)."""
    slots: dict[str, str] = dict(BUILTIN_SLOTS)
    for n, line in _lines(path):
        m = _SLOT_LINE.match(line)
        if m is None:
            raise RuleError(f"{path.name}:{n}: expected 'NAME = phrase | phrase ...'")
        name, body = m.groups()
        try:
            # top-level "|" separates phrases; each phrase may hold groups with their own "|"
            slots[name] = compile_phrase(f"({body})", slots)
        except ValueError as err:
            raise RuleError(f"{path.name}:{n}: {err}") from None
    return slots


def load_rules(path: Path, slots: dict[str, str]) -> list[Rule]:
    """The rules of one category file, in file order, benign spans under the signal "benign"."""
    rules, signal = [], None
    for n, line in _lines(path):
        if m := _SECTION.match(line):
            signal = m.group(1)
            continue
        if signal is None:
            raise RuleError(f"{path.name}:{n}: a phrase before the first [section]")
        try:
            first, *rest = (re.compile(rf"(?:{compile_phrase(part, slots)})(?![a-z0-9])") for part in line.split("&&"))
        except ValueError as err:
            raise RuleError(f"{path.name}:{n}: {err}") from None
        if signal == BENIGN and rest:
            raise RuleError(f"{path.name}:{n}: a benign span is one phrase ('&&' is for rules)")
        rules.append(Rule(signal, line, f"{path.name}:{n}", first, tuple(rest)))
    if not rules:
        raise RuleError(f"{path}: no rules")
    return rules


def literal_words(folder: Path) -> set[str]:
    """Every literal word of 5+ letters the rules and lexicon use, with common inflections: the
    key words the typo corrector reads misspellings as."""
    words: set[str] = set()
    for path in sorted(folder.glob("*.rules")):
        for _, line in _lines(path):
            if _SECTION.match(line):
                continue
            body = line.split("=", 1)[1] if _SLOT_LINE.match(line) else line
            for token in re.findall(r"[a-z0-9]+\*?", body):
                stem = token.rstrip("*")
                if token.endswith("*"):
                    base = stem[:-1] if stem.endswith("e") else stem
                    words.update({stem, stem + "s", stem + "ed", base + "ing", stem + "d", stem + "e", stem + "al",
                                  stem + "es", stem + "er"})
                else:
                    words.add(stem)
    return {w for w in words if len(w) >= 5 and w.isalpha()}
