"""The safety policy the runtime calls: the checks, and the crisis reply for each category.

The crisis reply is a message and a list of resources, both per category and per locale, read
from a crisis-resources file (built in: star_runtime/data/crisis_resources.json) so that a
deployment can translate the words and put in its own numbers:

    {
      "default": {                                  used for any locale the file does not list
        "message":   {"suicide_self_harm": "...", "harm_to_others": "...", ...},
        "resources": {"suicide_self_harm": ["line", ...], "medical_emergency": [...], ...}
      },
      "en-GB": {"resources": {...}}                 a locale may give only what differs
    }

Every category of star_runtime.safety.detector.CATEGORIES must have a message and resources
under "default". A locale is looked up exactly ("en-gb"), then by language ("en"), then
"default", for each category on its own. The older layout, locale -> list of lines (the same
lines for every category, the built-in messages), is still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from star_runtime.json_bytes import JSONBytesError, decode_json
from star_runtime.safety.detector import CATEGORIES, RuleSet, SafetyVerdict, rule_set

MAX_FILE_BYTES = 1 << 20  # a resources file is a few kB; a bound keeps /dev/zero from hanging us


class SafetyConfigError(ValueError):
    """A crisis-resources file that cannot be used; the message names the file and the problem."""


def _builtin_resources_path() -> Path:
    return Path(str(resources.files("star_runtime") / "data" / "crisis_resources.json"))


def _locale_key(locale: str) -> str:
    return locale.strip().replace("_", "-").lower()


def _read_json(path: Path) -> Any:
    def fail(problem: str) -> SafetyConfigError:
        return SafetyConfigError(f"crisis resources file {path}: {problem}")

    try:
        if not path.is_file():
            raise fail("is a folder, expected a JSON file" if path.is_dir() else
                       "no such file" if not path.exists() else "not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise fail(f"larger than {MAX_FILE_BYTES} bytes; a resources file is a few kB")
    try:
        return decode_json(raw, f"crisis resources file {path}")
    except JSONBytesError as err:
        raise SafetyConfigError(str(err)) from None


Table = dict[str, dict[str, dict[str, Any]]]  # locale -> {"message"|"resources": category -> value}


def load_resources(path: str | Path | None = None) -> Table:
    """Read and check a crisis-resources file (module docstring); None reads the built-in one.

    Raises SafetyConfigError naming the file and the problem.
    """
    path = Path(path) if path is not None else _builtin_resources_path()
    data = _read_json(path)

    def fail(problem: str) -> SafetyConfigError:
        return SafetyConfigError(f"crisis resources file {path}: {problem}")

    if not isinstance(data, dict):
        raise fail(f"expected a JSON object of locale -> entry, got {type(data).__name__}")
    table: Table = {}
    for locale, entry in data.items():
        if isinstance(entry, list):  # the older layout: one list of lines for every category
            entry = {"resources": dict.fromkeys(CATEGORIES, entry)}
        if not isinstance(entry, dict) or not set(entry) <= {"message", "resources"}:
            raise fail(f"locale {locale!r}: expected an object with \"message\" and/or \"resources\"")
        parsed: dict[str, dict[str, Any]] = {"message": {}, "resources": {}}
        for kind, per_category in entry.items():
            if not isinstance(per_category, dict):
                raise fail(f"locale {locale!r}, {kind}: expected an object of category -> value")
            for category, value in per_category.items():
                where = f"locale {locale!r}, {kind}.{category}"
                if category not in CATEGORIES:
                    raise fail(f"{where}: unknown category (known: {', '.join(CATEGORIES)})")
                if kind == "message":
                    if not isinstance(value, str) or not value.strip():
                        raise fail(f"{where}: expected a non-empty string")
                    parsed[kind][category] = value.strip()
                else:
                    if not isinstance(value, list) or not value or not all(
                            isinstance(line, str) and line.strip() for line in value):
                        raise fail(f"{where}: expected a non-empty list of non-empty strings")
                    parsed[kind][category] = [line.strip() for line in value]
        table[_locale_key(locale)] = parsed
    default = table.get("default")
    if default is None:
        raise fail('no "default" entry (it is used for every locale the file does not list)')
    builtin = None
    for category in CATEGORIES:
        if category not in default["resources"]:
            raise fail(f'"default" has no resources for {category}')
        if category not in default["message"]:
            if builtin is None:
                builtin = load_resources() if path != _builtin_resources_path() else None
            if builtin is None:
                raise fail(f'"default" has no message for {category}')
            default["message"][category] = builtin["default"]["message"][category]
    return table


def lookup(table: Table, locale: str, kind: str, category: str) -> Any:
    """table's `kind` for `category` in `locale`: exact, then language, then "default"."""
    key = _locale_key(locale)
    for candidate in (key, key.split("-")[0], "default"):
        value = table.get(candidate, {}).get(kind, {}).get(category)
        if value is not None:
            return value
    raise KeyError(category)


@dataclass(frozen=True)
class SafetyPolicy:
    """The safety layer as the runtime uses it.

        policy = SafetyPolicy.load()                        # built-in resources and rules
        verdict = policy.check_user(message)                # also the situation
        if verdict.escalate: text = policy.crisis_reply(verdict.category)
        verdict = policy.check_reply(model_reply, crisis_category=...)   # before anyone sees it

    Detection is English only: the rules are English phrases (star_runtime/data/safety/).
    """

    table: Table = field(repr=False)
    locale: str = "default"
    rules: RuleSet = field(default_factory=rule_set, repr=False)

    @classmethod
    def load(cls, path: str | Path | None = None, locale: str = "default", *,
             rules_dir: str | Path | None = None) -> SafetyPolicy:
        """Policy with the crisis replies of `locale` from `path` (None: the built-in file), and
        the rules of `rules_dir` (None: the built-in ones)."""
        if not isinstance(locale, str):
            raise SafetyConfigError(f"a locale is a string such as 'en-GB', not {type(locale).__name__}")
        return cls(load_resources(path), locale, rule_set(str(rules_dir) if rules_dir is not None else None))

    def check_user(self, text: str) -> SafetyVerdict:
        """Crisis verdict for something a person wrote: a message or a situation."""
        return self.rules.check_user(text)

    def check_reply(self, text: str, *, crisis_category: str | None = None) -> SafetyVerdict:
        """Is a model reply unsafe (RuleSet.check_reply)? crisis_category: the conversation's crisis,
        if one escalated (then agreement such as "go ahead" counts too)."""
        return self.rules.check_reply(text, crisis_category=crisis_category)

    def resources(self, category: str = "suicide_self_harm") -> list[str]:
        return list(lookup(self.table, self.locale, "resources", category))

    def crisis_reply(self, category: str = "suicide_self_harm") -> str:
        """The caring message for `category` followed by its resources, one per line."""
        message = lookup(self.table, self.locale, "message", category)
        return "\n".join((message, *(f"- {line}" for line in self.resources(category))))
