"""Nothing printed to a terminal carries control characters (star_runtime.terminal.printable).

Hostile strings go where the programs print text they did not write: a manifest's model_type and
strategy labels, a model reply (streamed and final), the user's echoed /situation, a file name.
star-chat's Session runs in-process on a stand-in runtime that returns those strings, with a rich
Console writing to a string that is not a terminal (so rich adds no escape codes of its own and
every ESC, C1 or bidi character in the output came from the data).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from star_runtime import Reply, Timings
from star_runtime.chat import Session, banner, build_parser, run_pipe
from star_runtime.terminal import printable

TITLE = "\x1b]0;pwned\x07"  # OSC: sets the terminal's title
FAKE_REPLY = "\x1b[1A\x1b[2K"  # cursor up, erase line: the real reply above is overwritten
HIDDEN = "\x1b[8m"  # SGR conceal
C1_CSI = "\x9b2J"  # 8-bit CSI: erase the screen
BIDI = "\u202eevil\u202c"  # right-to-left override
HOSTILE = TITLE + FAKE_REPLY + HIDDEN + C1_CSI + BIDI + "\r"
FORBIDDEN = ("\x1b", "\x07", "\x9b", "\u202e", "\u202c", "\r")


def clean(output: str) -> None:
    found = [hex(ord(c)) for c in FORBIDDEN if c in output]
    assert not found, f"control characters {found} reached the terminal: {output!r}"


def test_printable_strips_controls_and_bidi_but_keeps_text() -> None:
    assert printable(f"a{HOSTILE}b") == "a]0;pwned[1A[2K[8m2Jevilb"
    assert printable("one\ntwo\tthree") == "one two three"
    assert printable("one\ntwo", newlines=True) == "one\ntwo"
    assert printable("I'm 😀 happy 👩\u200d💻 é 你好") == "I'm 😀 happy 👩\u200d💻 é 你好"  # ZWJ emoji kept
    assert printable(3) == "3"


def test_vocabulary_control_tokens_are_what_printable_removes(tokenizer_dir) -> None:
    import unicodedata

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    special = [t for t in vocab if any(unicodedata.category(c) in ("Cc", "Cf") for c in t)]
    stripped = [t for t in vocab if printable(t, newlines=True) != t]
    # Measured on the real vocabulary (the numbers in terminal.py's docstring).
    assert (len(vocab), len(special), len(stripped)) == (54944, 55, 41)
    clean("".join(printable(t, newlines=True) for t in stripped))


class _Conversation:
    def situation_reply(self) -> None:
        return None

    def reply(self, text: str, on_token=None) -> Reply:
        for piece in ("Hello", HOSTILE, " there"):
            if on_token is not None:
                on_token(piece)
        label = "Question" + HOSTILE
        return Reply("Hello" + HOSTILE + " there", label, {label: 0.9, "[Others]" + BIDI: 0.1}, Timings(reply_ms=1.0))


def _runtime() -> SimpleNamespace:
    manifest = {"model_config": {"model_type": "blenderbot-small" + HOSTILE, "d_model": 8, "encoder_layers": 1,
                                 "decoder_layers": 1, "vocab_size": 10, "star": {}},
                "precision": "float32"}
    return SimpleNamespace(path=Path("/tmp") / ("bundle" + TITLE), device="cpu", manifest=manifest,
                           spec=SimpleNamespace(vocab_size=10, output_size=7), conversation=lambda **kw: _Conversation())


def test_star_chat_session_prints_no_control_characters(monkeypatch) -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, highlight=False)
    typed = iter(["/situation I lost my job" + HOSTILE, "/situation", "hi", "/strategy", "/nope" + TITLE,
                  "/save /nonexistent-dir" + TITLE + "/x.json", "/quit"])
    monkeypatch.setattr(console, "input", lambda prompt="": next(typed))
    args = build_parser().parse_args(["--show-probs", "--timings"])
    console.print(banner(_runtime()))
    session = Session(_runtime(), args, console)
    assert session.run() == 0
    text = out.getvalue()
    assert "blenderbot-small" in text and "Hello" in text and "I lost my job" in text and "Question" in text
    clean(text)


def test_star_chat_json_lines_carry_no_control_characters() -> None:
    out = io.StringIO()
    args = build_parser().parse_args([])
    runtime = _runtime()
    run_pipe(runtime, args, io.StringIO("hi\n"), out)
    record = json.loads(out.getvalue())
    assert record["reply"] == "Hello]0;pwned[1A[2K[8m2Jevil there"
    clean(record["reply"] + record["strategy"] + "".join(record["strategy_probs"]))


def test_one_line_errors_carry_no_control_characters(tmp_path) -> None:
    name = tmp_path / ("no-bundle" + TITLE + FAKE_REPLY)
    done = subprocess.run([sys.executable, "-m", "star_runtime.chat", "--model", str(name)], input=b"hi\n",
                          capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 2 and err.count("\n") == 1 and "no-bundle" in err, err
    clean(err)
