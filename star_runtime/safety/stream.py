"""Streaming that is screened before anyone sees it.

A reply streams as pieces of text. ScreenedStream holds them back, screens the whole reply up to
a safe point (SafetyPolicy.check_reply), and only then passes the new text on:

    text   = every piece so far                      (the model's reply as it grows)
    point  = the later of: the end of the last clause mark (. , ; : ! ?) in `text`,
                           the word boundary HOLD_WORDS words before the end of `text`
    if text[:point] is unsafe:  stop decoding; nothing more is passed on  (`verdict` says why)
    else:                       emit(text[released:point]); released = point

A rule's phrase never crosses a clause mark and is at most HOLD_WORDS words long, so when a
phrase of the rules completes, none of its words has been passed on yet: `emit` never receives
any part of the text the screen rejects. `finish(final)` screens the whole reply and passes on
the rest.
"""

from __future__ import annotations

from collections.abc import Callable

from star_runtime.safety.detector import NO_CRISIS, SafetyVerdict
from star_runtime.safety.policy import SafetyPolicy

_CLAUSE = frozenset(".,;:!?\n")
# The longest phrases of model_reply.rules run to about 12 words (an urge of up to 6, "do the
# world a favour and", two fillers, a verb, a two-word target); 16 leaves a margin. Text before a
# clause mark is released at once, so the bound only delays long clauses.
HOLD_WORDS = 16


class ScreenedStream:
    """Pieces in, screened text out through `emit` (module docstring).

    render: how the reply is shown (star_runtime.detok.readable in the runtime); the screen reads
    and `emit` receives the rendered reply. Rendering can still change the last word ("don '"
    becomes "don't" once "t" arrives, "that" takes the "." that follows it), so the last word is
    held back too, and nothing is passed on that the rendered text no longer starts with.
    emit(text) -> False asks to stop (the app's "enough"); `app_stopped` says it did.
    """

    def __init__(self, policy: SafetyPolicy, emit: Callable[[str], bool | None] | None, *,
                 crisis_category: str | None = None, render: Callable[[str], str] = str) -> None:
        self.policy, self.emit, self.crisis_category, self.render = policy, emit, crisis_category, render
        self.raw = ""  # the pieces as they came
        self.text = ""  # render(raw): what the screen reads and the person sees
        self.emitted = ""  # what has been passed on: always a prefix of `text` when it grows
        self.verdict: SafetyVerdict = NO_CRISIS
        self.app_stopped = False

    def _safe_point(self) -> int:
        text, words, released = self.text, 0, len(self.emitted)
        stable = text.rfind(" ")  # the last word may still change
        for k in range(stable - 1, released - 1, -1):
            if text[k] in _CLAUSE:
                return max(released, k + 1)
            if text[k].isspace() and k + 1 < len(text) and not text[k + 1].isspace():
                words += 1
                if words == HOLD_WORDS:
                    return k + 1
        return released

    def _release(self, upto: int) -> bool:
        """Screen text[:upto]; pass on what is new. False: stop decoding (unsafe or app asked)."""
        if upto <= len(self.emitted) or not self.text.startswith(self.emitted):
            return True
        verdict = self.policy.check_reply(self.text[:upto], crisis_category=self.crisis_category)
        if verdict.escalate:
            self.verdict = verdict
            return False
        new = self.text[len(self.emitted):upto]
        self.emitted += new
        if self.emit is not None and self.emit(new) is False:
            self.app_stopped = True
            return False
        return True

    def feed(self, piece: str) -> bool:
        """Add one piece of the reply; False means stop decoding."""
        self.raw += piece
        self.text = self.render(self.raw)
        return self._release(self._safe_point())

    def finish(self, final: str | None = None) -> SafetyVerdict:
        """Screen the whole reply (`final`, the reply as decoded; default: the pieces joined),
        rendered, and pass on the rest when it is safe. Returns the verdict on the whole reply."""
        if self.verdict.escalate:
            return self.verdict
        self.text = self.render(final if final is not None else self.raw)
        verdict = self.policy.check_reply(self.text, crisis_category=self.crisis_category)
        if verdict.escalate:
            self.verdict = verdict
            return verdict
        if not self.app_stopped and self.emit is not None and self.text.startswith(self.emitted):
            rest, self.emitted = self.text[len(self.emitted):], self.text
            if rest:
                self.emit(rest)
        return verdict
