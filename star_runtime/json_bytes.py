"""One guarded JSON decoder for every byte string the runtime parses itself: the bundle's manifest
and tokenizer files, a crisis-resources file, a request body of star-serve.

Python's `json.loads` alone lets three things through that a file from elsewhere may hold: bytes
that are not UTF-8 (UnicodeDecodeError, not a JSONDecodeError), NaN and Infinity (JSON has
neither; Python accepts them), and nesting deep enough to exhaust the recursion limit
(RecursionError). Each becomes one JSONBytesError whose message names the source and the line.
"""

from __future__ import annotations

import json
from typing import Any


class JSONBytesError(ValueError):
    """Bytes that are not one JSON value: `problem` in words, `source:line: problem` as the message."""

    def __init__(self, source: str, problem: str, line: int | None = None) -> None:
        self.source, self.problem, self.line = source, problem, line
        super().__init__(f"{source}:{line}: {problem}" if line is not None else f"{source}: {problem}")


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def decode_json(data: bytes, source: str) -> Any:
    """UTF-8 JSON bytes -> the value; JSONBytesError (a ValueError) naming `source` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JSONBytesError(source, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise JSONBytesError(source, f"not valid JSON: {err.msg} (column {err.colno})", err.lineno) from None
    except RecursionError:
        raise JSONBytesError(source, "nested too deeply") from None
    except ValueError as err:  # NaN, Infinity
        raise JSONBytesError(source, f"not valid JSON: {err}") from None
