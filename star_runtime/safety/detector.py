"""The matching engine: a message, read every way star_runtime.safety.text gives, against the rules.

For a text x and the ordered (label, rules) groups of one check:

    for (variant, n) in variants(x):                 plain, joined, reversed readings
        n = corrector.correct(n)                     misspelt key words read as meant
        for label, rules in groups:                  priority order; first accepted wins
            for rule in rules, for each match m of rule in n that starts a word:
                accept m  unless  a [benign] span overlaps m       ("killing myself laughing")
                          or      a NEGATION ends right before m   ("I would never")
    verdict = (label, rule's section = the signal, the phrase as written, the rule's file:line)

Negation, the choice made: only a categorical denial right before the match cancels it ("never",
"not", "won't", "no intention of", "don't" + the verb). "I don't want to kill myself" is NOT a
denial: people say it while the thought is present, and a clinician would ask rather than move on.
"""

from __future__ import annotations

import hashlib
import re
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path

from star_runtime.safety.rules import BENIGN, Rule, RuleError, data_dir, literal_words, load_lexicon, load_rules
from star_runtime.safety.semantic import SemanticScreen
from star_runtime.safety.text import unescaped, variants
from star_runtime.safety.typos import Corrector

# The verdict categories, in priority order when several match: a body in danger now first, so
# that "I took all my pills to kill myself" gets the emergency number before the crisis line.
CATEGORIES = ("medical_emergency", "suicide_self_harm", "harm_to_others", "abuse_safeguarding")
MODEL_REPLY_FILE = "model_reply.rules"
AGREEMENT = "agreement"  # model_reply.rules section that counts only after a crisis
# How far back a denial may sit: "I would never, ever really" is 27 characters.
NEGATION_WINDOW = 48
USER_VERDICTS = 4096  # texts whose verdict is remembered (about 0.5 MB)


@dataclass(frozen=True)
class SafetyVerdict:
    """What the detector found.

    category: one of CATEGORIES; signal: the rules file section that matched (what a screener
    would ask about: "ideation", "plan", "overdose", ...); matched: the phrase as written, for
    logs; rule: the "file:line" of the rule, for reviews.
    """

    escalate: bool
    category: str | None = None
    signal: str | None = None
    matched: str | None = None
    rule: str | None = None


NO_CRISIS = SafetyVerdict(False)
_Groups = Sequence[tuple[str, Sequence[Rule]]]


class _Benign:
    """Benign spans of one normalised text, found on first use (most messages never need them).

    Overlap of [start, end) with any span in O(log n): spans sorted by start, with the running
    maximum of their ends, so a 100 kB message full of idioms stays linear overall.
    """

    def __init__(self, norm: str, rules: Sequence[Rule]) -> None:
        self._norm, self._rules = norm, rules
        self._starts: list[int] | None = None
        self._max_end: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        if self._starts is None:
            spans = sorted(m.span() for r in self._rules for m in _word_matches(r.pattern, self._norm))
            self._starts = [s for s, _ in spans]
            self._max_end = list(accumulate((e for _, e in spans), max))
        k = bisect_left(self._starts, end)  # spans [0, k) start before `end`
        return k > 0 and self._max_end[k - 1] > start


def _word_matches(pattern: re.Pattern[str], norm: str) -> Iterator[re.Match[str]]:
    """Matches of `pattern` that start a word, overlapping ones included.

    Searching again from start + 1 (not from the end, as finditer does) means a match that is
    dropped cannot hide a later one that overlaps it.
    """
    pos = 0
    while (m := pattern.search(norm, pos)) is not None:
        if m.start() == 0 or not norm[m.start() - 1].isalnum():
            yield m
        pos = m.start() + 1


class RuleSet:
    """Every rules file of one folder, compiled: the user-message categories, the model-reply
    screen, the benign spans, the negations and the typo corrector built from their words."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        slots = load_lexicon(folder / "lexicon.rules")
        for name in ("NEGATION", "NEGATION_FILLER"):
            if name not in slots:
                raise RuleError(f"{folder / 'lexicon.rules'}: no {name} slot")
        self.negation = re.compile(rf"(?<![a-z])(?:{slots['NEGATION']})(?: ,)?(?: (?:{slots['NEGATION_FILLER']}),?)* ?$")
        self.categories: list[tuple[str, list[Rule]]] = []
        benign: list[Rule] = []
        for name in (*CATEGORIES, MODEL_REPLY_FILE.removesuffix(".rules")):
            path = folder / f"{name}.rules"
            if not path.is_file():
                raise RuleError(f"{path}: missing (every category has a rules file)")
            rules = load_rules(path, slots)
            benign += [r for r in rules if r.signal == BENIGN]
            self.categories.append((name, [r for r in rules if r.signal != BENIGN]))
        self.user_groups: _Groups = self.categories[:len(CATEGORIES)]
        reply = self.categories[-1][1]
        self.reply_rules = [r for r in reply if r.signal != AGREEMENT]
        self.agreement_rules = [r for r in reply if r.signal == AGREEMENT]
        self.benign = benign
        self.corrector = Corrector(literal_words(folder))
        self._has_semantic = (folder / "prototypes.jsonl").is_file()  # a deployment's rules may have none
        self._verdicts: dict[bytes, SafetyVerdict] = {}
        self._verdicts_lock = threading.Lock()

    def _negated(self, norm: str, start: int) -> bool:
        window = norm[max(0, start - NEGATION_WINDOW):start]
        window = window[window.rfind(" . ") + 1:] if " . " in window else window
        return self.negation.search(window) is not None

    def _accepted(self, pattern: re.Pattern[str], norm: str, benign: _Benign) -> bool:
        """Does `pattern` match somewhere in `norm`, neither denied nor inside a benign span?"""
        return any(not self._negated(norm, m.start()) and not benign.overlaps(*m.span())
                   for m in _word_matches(pattern, norm))

    def find(self, text: str, groups: _Groups) -> SafetyVerdict:
        """First accepted match of the (label, rules) groups in order, over every reading."""
        for _, (norm, starts, ends) in variants(text):
            norm, starts, ends = self.corrector.correct((norm, starts, ends))
            benign = _Benign(norm, self.benign)
            for label, rules in groups:
                for rule in rules:
                    for m in _word_matches(rule.pattern, norm):
                        if self._negated(norm, m.start()) or benign.overlaps(*m.span()):
                            continue
                        if rule.also and not all(self._accepted(p, norm, benign) for p in rule.also):
                            break  # the other parts are absent: no match of this rule will do
                        a, b = m.start(), m.end() - 1
                        lo, hi = min(starts[a], starts[b]), max(ends[a], ends[b])
                        return SafetyVerdict(True, label, rule.signal, _visible(text, lo, hi), rule.where)
        return NO_CRISIS

    def check_user(self, text: str) -> SafetyVerdict:
        """Crisis verdict for something a person wrote (a message or a situation): the rules,
        then the semantic screen (safety.semantic) for what their words do not cover.

        A pure function of the text, remembered for the last USER_VERDICTS texts (keyed by their
        digest, so a 100 kB message costs 32 bytes of key): a stateless server re-checks every
        user message of the history on each request, 17 ms each with the screen."""
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32).digest()
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._check_user(text)
            with self._verdicts_lock:  # a server's threads share the rule set
                if len(self._verdicts) >= USER_VERDICTS:
                    self._verdicts.pop(next(iter(self._verdicts)))  # the oldest
                self._verdicts[key] = verdict
        return verdict

    def _check_user(self, text: str) -> SafetyVerdict:
        verdict = self.find(text, self.user_groups)
        if verdict.escalate or self.semantic is None:
            return verdict
        match = self.semantic.check(unescaped(text))
        if match is None:
            return verdict
        return SafetyVerdict(True, match.category, "semantic", match.unit, f"prototypes.jsonl:{match.line}")

    @property
    def semantic(self) -> SemanticScreen | None:
        """The semantic screen, loaded on first use (a 23 MB encoder), shared by every policy."""
        return _semantic(str(self.folder)) if self._has_semantic else None

    def check_reply(self, text: str, *, crisis_category: str | None = None) -> SafetyVerdict:
        """Is a model reply unsafe? It encourages, endorses or instructs harm (model_reply.rules),
        agrees with a person in crisis (its [agreement] section, only with `crisis_category`),
        or voices a crisis itself (the user rules: a small model improvising "I want to die too"
        helps no one). The verdict's category is the conversation's crisis if there is one."""
        groups: list[tuple[str, Sequence[Rule]]] = [("model_reply", self.reply_rules)]
        if crisis_category is not None:
            groups.append(("model_reply", self.agreement_rules))
        verdict = self.find(text, [*groups, *self.user_groups])
        if not verdict.escalate or verdict.category != "model_reply":
            return verdict
        return SafetyVerdict(True, crisis_category or "suicide_self_harm", verdict.signal, verdict.matched,
                             verdict.rule)


def _visible(text: str, lo: int, hi: int) -> str:
    """text[lo:hi] as printable as it was written: escape codes and controls dropped."""
    return unescaped(text)[lo:hi] if lo < hi else ""


@lru_cache(maxsize=2)
def _semantic(folder: str) -> SemanticScreen:
    return SemanticScreen(Path(folder) / "encoder", Path(folder) / "prototypes.jsonl")


@lru_cache(maxsize=4)
def rule_set(folder: str | None = None) -> RuleSet:
    """The compiled rules of `folder` (None: the built-in ones), compiled once per process."""
    return RuleSet(Path(folder) if folder is not None else data_dir())
