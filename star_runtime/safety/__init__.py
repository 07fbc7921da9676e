"""Safety layer: crisis detection on what people write, a screen on model replies, crisis replies.

A rule-based, English-only support tool, not a clinician (README, "Safety"; docs/safety.md has
what it covers and how well, measured). The parts, in the order text flows through them:

    text.py      the readings of a message: folded, escape codes cut, joined and reversed tricks undone
    typos.py     misspelt key words read as meant (bounded edit distance, English words left alone)
    rules.py     the rule language; the rules themselves are data: star_runtime/data/safety/*.rules,
                 one file per category, reviewable without reading Python
    detector.py  the engine: categories in priority order, benign spans, negation -> SafetyVerdict
    policy.py    SafetyPolicy: the checks plus the crisis reply per category and locale
    stream.py    ScreenedStream: streamed text held back to a word boundary and screened first
"""

from star_runtime.safety.detector import CATEGORIES, NO_CRISIS, RuleSet, SafetyVerdict, rule_set
from star_runtime.safety.policy import SafetyConfigError, SafetyPolicy, load_resources
from star_runtime.safety.rules import RuleError


def detect_crisis(text: str) -> SafetyVerdict:
    """Crisis verdict of the built-in rules for `text` (SafetyPolicy.check_user without a policy)."""
    return rule_set().check_user(text)


def encourages_harm(reply: str, *, crisis_category: str | None = None) -> str | None:
    """The phrase of a model reply that makes it unsafe (built-in rules), or None."""
    return rule_set().check_reply(reply, crisis_category=crisis_category).matched


__all__ = ["CATEGORIES", "NO_CRISIS", "RuleError", "RuleSet", "SafetyConfigError", "SafetyPolicy", "SafetyVerdict",
           "detect_crisis", "encourages_harm", "load_resources", "rule_set"]
