"""star-chat driven as a real process: through a pseudo-terminal (interactive) and pipes (JSON lines).

One tiny random bundle per test session (tests/star_bundles.py, shared with the export and
runtime tests). Its replies are random words; what is checked is the client: streaming, every
command, the ends of a session, the safety layer's escalations as shown, and the one-line
errors. Only Ctrl-C in the middle of a reply is driven in-process: the tiny model answers in
well under a second, too fast to hit from outside without a race.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from star_runtime.safety import SafetyPolicy

STAR_CHAT = [sys.executable, "-m", "star_runtime.chat"]
TIMEOUT = 60  # seconds for one step of a session; a loaded 2-core machine starts one in ~2 s
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLUMNS = 4000  # wide enough that no reply wraps: a streamed frame is then one line


@pytest.fixture(scope="module")
def labels(bundle) -> list[str]:
    return json.loads((bundle / "manifest.json").read_text())["strategies"]["labels"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STAR_BUNDLE", "COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color", **extra}


def run_pipe(args: list[str], lines: list[str | bytes], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    return subprocess.run(STAR_CHAT + args, input=data,
                          capture_output=True, timeout=TIMEOUT * 2, env=env or _env())


# ---------------------------------------------------------------------------------------------
# Interactive mode, through a pseudo-terminal
# ---------------------------------------------------------------------------------------------


class Terminal:
    """star-chat on the slave side of a pty; the test types on the master side.

    `raw` is everything it wrote; `text` the same without ANSI codes, read up to `pos` so far.
    """

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(STAR_CHAT + args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                     env=_env(), start_new_session=True)
        os.close(slave)
        self.master, self.raw, self.pos = master, "", 0

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def _read(self, timeout: float) -> bool:
        """Append what the process wrote within `timeout`; False if nothing came or it ended."""
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.master, 1 << 16)
        except OSError:  # EIO: the process closed the terminal
            return False
        self.raw += chunk.decode("utf-8", errors="replace")
        return bool(chunk)

    def read_until(self, marker: str, timeout: float = TIMEOUT) -> str:
        """The output from `pos` up to and including the next `marker`, ANSI codes stripped."""
        end = time.monotonic() + timeout
        while (i := self.text.find(marker, self.pos)) < 0:
            if not self._read(max(0.0, end - time.monotonic())):
                raise AssertionError(f"no {marker!r}; star-chat wrote:\n{self.text[self.pos:]}")
        out, self.pos = self.text[self.pos : i + len(marker)], i + len(marker)
        return out

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def ctrl_d(self) -> None:
        """Ctrl-D at the prompt, once readline has the terminal. A Ctrl-D that arrives while the
        terminal is still in canonical mode (the prompt printed, readline not yet reading) is an
        end-of-file mark the switch to readline's mode loses, and the session would wait forever:
        a race of the test, not something a person can hit."""
        self._wait_for_readline()
        self.type("\x04")

    def ctrl_c(self) -> None:
        """Ctrl-C at the prompt, once readline waits for a key. CPython's readline blocks in
        select() with no timeout; a SIGINT that lands after the prompt is printed but before that
        select() starts is only noticed at the next key, so the session would wait forever: a race
        of the test (a person presses Ctrl-C at a prompt they can see, or presses it again), so a
        SIGINT that got no answer within a second is sent again, up to five times."""
        self._wait_for_readline()
        for _ in range(5):
            self.proc.send_signal(signal.SIGINT)  # what the terminal sends (the pty is not its tty)
            try:
                self.proc.wait(timeout=1)
                return
            except subprocess.TimeoutExpired:
                continue

    def _wait_for_readline(self) -> None:
        end = time.monotonic() + 10
        while termios.tcgetattr(self.master)[3] & termios.ICANON and time.monotonic() < end:
            time.sleep(0.02)

    def command(self, line: str, marker: str | None = None) -> str:
        """Type a line; the output up to `marker` and then up to the next prompt."""
        self.type(line + "\r")
        return (self.read_until(marker) if marker else "") + self.read_until("you>")

    def wait(self) -> int:
        rc = self.proc.wait(timeout=TIMEOUT)
        while self._read(0.1):  # what it wrote last
            pass
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(bundle, tmp_path):
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal(["--model", str(bundle), *args], tmp_path)
        opened.append(term)
        term.read_until("you>")
        return term

    yield start
    for term in opened:
        term.close()


def test_interactive_session_streams_and_runs_every_command(terminal, bundle, labels, tmp_path) -> None:
    term = terminal("--seed", "3", "--timings", "--show-probs")
    banner = term.text
    assert str(bundle.resolve()) in banner and "d_model 32" in banner and "float32" in banner
    assert "device  cpu" in banner and "not a substitute for professional help" in banner

    # A reply: streamed piece by piece, then printed whole with its strategy, timings, probabilities.
    start = len(term.raw)
    out = term.command("I feel so alone since I moved to a new city.", "strategy:")
    streamed = term.raw[start:]
    assert "ms/token" in out and all(label in out for label in labels)  # --timings, --show-probs

    term.command("Today was good 😀 but tomorrow scares me", "strategy:")
    # A crisis: the resources in a red panel, marked escalated; the model did not run.
    out = term.command("I want to kill myself", "escalated")
    assert "please reach out to a person" in out
    assert all(line in out for line in SafetyPolicy.load().resources("suicide_self_harm"))
    assert "safety layer" in term.command("/strategy")

    out = term.command("/help", "/quit")
    assert all(cmd in out for cmd in ("/help", "/reset", "/situation TEXT", "/strategy", "/save FILE"))
    term.command("/nope", "unknown command /nope")
    term.command("/situation I lost my job last week.", "situation set")
    term.command("/situation", "situation: I lost my job last week.")
    term.command("Can you help me?", "strategy:")
    out = term.command("/strategy", "%")
    assert all(label in out for label in labels)
    term.command("/reset", "new conversation")
    term.command("/strategy", "no reply yet")
    term.command(f"/save {tmp_path / 'no-such-folder' / 't.json'}", "cannot save")
    term.command("/save", "usage: /save FILE")
    term.command("/save transcript.json", "transcript saved")

    term.ctrl_d()
    assert term.wait() == 0
    assert "Traceback" not in term.text

    # The transcript: every turn, grouped by conversation; nothing else written to the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transcript.json"]
    saved = json.loads((tmp_path / "transcript.json").read_text(encoding="utf-8"))
    assert saved["model"] == str(bundle.resolve()) and saved["device"] == "cpu"
    first, second = saved["conversations"]  # the empty one after /reset is left out
    assert [t["user"] for t in first["turns"]] == [
        "I feel so alone since I moved to a new city.", "Today was good 😀 but tomorrow scares me",
        "I want to kill myself"]
    assert [t["escalated"] for t in first["turns"]] == [False, False, True]
    assert first["turns"][2]["reply"] == SafetyPolicy.load().crisis_reply()
    assert second["situation"] == "I lost my job last week." and second["seed"] == 3
    assert [t["user"] for t in second["turns"]] == ["Can you help me?"]

    # Streaming: the first reply was printed once, as the screen passed it on, after "star> ",
    # and nothing on screen was erased to make room for it (no erase-line or cursor-up codes).
    reply = first["turns"][0]["reply"]
    assert ANSI.sub("", streamed).count(reply) == 1 and "star> " + reply in ANSI.sub("", streamed)
    assert "\x1b[2K" not in streamed and "\x1b[1A" not in streamed


def test_quit_command_ends_the_session(terminal) -> None:
    term = terminal()
    term.type("/quit\r")
    assert term.wait() == 0


def test_ctrl_c_at_the_prompt_ends_the_session_cleanly(terminal) -> None:
    term = terminal()
    term.ctrl_c()
    assert term.wait() == 0
    assert "Traceback" not in term.raw and "KeyboardInterrupt" not in term.raw


def test_ctrl_c_during_a_reply_ends_that_reply_not_the_session(bundle) -> None:
    from io import StringIO

    from rich.console import Console

    from star_runtime import Runtime
    from star_runtime.chat import Session, build_parser

    console = Console(file=StringIO(), force_terminal=True, width=COLUMNS)
    session = Session(Runtime.load(bundle), build_parser().parse_args(["--seed", "0"]), console)
    conversation = session.conv

    class CtrlCAfterFirstPiece:
        def reply(self, text, on_token):
            def press(piece: str):
                os.kill(os.getpid(), signal.SIGINT)  # handled before kill returns, in this thread
                return on_token(piece)

            return conversation.reply(text, on_token=press)

    full = Session(Runtime.load(bundle), build_parser().parse_args(["--seed", "0"]), console)
    full.say("I can't sleep.")
    handler = signal.getsignal(signal.SIGINT)
    session.conv = CtrlCAfterFirstPiece()
    session.say("I can't sleep.")
    # stopped right after the first piece the screen passed on, before the whole reply
    assert len(session.last_reply.timings.token_ms) < len(full.last_reply.timings.token_ms)
    assert "stopped (Ctrl-C)" in ANSI.sub("", console.file.getvalue())
    assert signal.getsignal(signal.SIGINT) is handler  # restored: Ctrl-C at the prompt ends again
    session.conv = conversation  # the session goes on
    session.say("Are you there?")
    assert len(session.last_reply.timings.token_ms) > 1


def test_a_crisis_in_the_situation_gets_the_crisis_reply_at_once(terminal) -> None:
    term = terminal("--situation", "I am going to kill myself tonight")
    opening = term.text  # banner, then the panel, before the first prompt
    assert "please reach out to a person" in opening and "the situation describes a crisis" in opening
    assert all(line in opening for line in SafetyPolicy.load().resources("suicide_self_harm"))
    out = term.command("/situation my stepdad hits me every night and I'm scared to go home", "escalated")
    assert all(line in out for line in SafetyPolicy.load().resources("abuse_safeguarding"))
    out = term.command("/situation I lost my job last week.", "situation set")
    assert "please reach out" not in out


def test_a_paste_longer_than_the_terminal_line_limit_is_read_whole(terminal) -> None:
    term = terminal()
    paste = "I have been thinking about everything that happened this year. " * 160
    ending = " and tonight I will end my life"
    paste = paste[:10_000 - len(ending)] + ending
    assert len(paste) == 10_000
    for k in range(0, len(paste), 500):  # type it as a terminal delivers a paste, draining the echo
        term.type(paste[k:k + 500])
        while term._read(0.05):
            pass
    term.type("\r")
    out = term.read_until("you>")
    assert "please reach out to a person" in out or "too long" in out, out[-500:]
    assert "please reach out to a person" in out  # with readline: read whole, and escalated


# ---------------------------------------------------------------------------------------------
# Non-interactive mode, through pipes
# ---------------------------------------------------------------------------------------------


def test_pipe_mode_answers_one_json_line_per_input_line(bundle, labels, tmp_path) -> None:
    resources = tmp_path / "crisis.json"
    resources.write_text(json.dumps({"default": ["Call the clinic: 555 0100."],
                                     "fr": ["Appelez le 3114, jour et nuit."]}), encoding="utf-8")
    lines = ["hello, I had a rough week at work", "", "   ", "mon chat est mort 😿🙏", "x" * 100_000,
             "I want to end my life tonight", "I would never hurt myself, I just feel tired",
             b"caf\xe9 \xff not UTF-8", b"\x00\xff\xfe\x00\x89PNG\x00\x1a"]
    done = run_pipe(["--model", str(bundle), "--seed", "0", "--safety-config", str(resources),
                     "--locale", "fr-FR"], lines)
    assert done.returncode == 0 and done.stderr == b""  # no banner, no warning
    out = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert len(out) == len(lines)
    assert out[1] == out[2] == {"error": "empty message"}
    assert out[8]["error"].startswith("binary data, not text")
    for i in (0, 3, 4, 6, 7):  # answered by the model
        assert set(out[i]) == {"reply", "strategy", "strategy_probs", "escalated", "escalation", "timings"}
        assert out[i]["reply"] and out[i]["strategy"] in labels and out[i]["escalated"] is False
        assert list(out[i]["strategy_probs"]) == labels
        assert sum(out[i]["strategy_probs"].values()) == pytest.approx(1, abs=1e-4)
        assert out[i]["timings"]["reply_ms"] > 0 and out[i]["timings"]["tokens"] >= 1
    crisis = out[5]
    assert crisis["escalated"] is True and crisis["strategy"] is None
    assert crisis["reply"] == SafetyPolicy.load(resources, "fr-FR").crisis_reply()
    assert "Appelez le 3114, jour et nuit." in crisis["reply"]


def test_pipe_mode_a_crisis_situation_answers_the_first_line(bundle) -> None:
    done = run_pipe(["--model", str(bundle), "--seed", "0", "--situation", "my boyfriend strangled me last night"],
                    ["hello", "are you there?"])
    first, second = (json.loads(line) for line in done.stdout.decode().splitlines())
    assert first["escalated"] is True and first["escalation"]["trigger"] == "situation"
    assert first["escalation"]["category"] == "abuse_safeguarding"
    assert first["reply"] == SafetyPolicy.load().crisis_reply("abuse_safeguarding")
    assert second["escalated"] is False and second["strategy"]


def test_pipe_mode_greedy_ignores_the_seed_and_star_bundle_names_the_default(bundle) -> None:
    lines = ["I lost my job and I do not know what to tell my family."]
    by_flag = run_pipe(["--model", str(bundle), "--greedy", "--seed", "1"], lines)
    by_env = run_pipe(["--greedy", "--seed", "2"], lines, env=_env(STAR_BUNDLE=str(bundle)))
    assert by_flag.returncode == by_env.returncode == 0
    assert json.loads(by_flag.stdout)["reply"] == json.loads(by_env.stdout)["reply"]


# ---------------------------------------------------------------------------------------------
# One clear line and exit 1 for whatever makes the session impossible
# ---------------------------------------------------------------------------------------------


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"", (done.returncode, done.stdout, err)
    assert err.startswith("star-chat: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_and_broken_bundles_give_one_line(bundle, tmp_path) -> None:
    err = _one_line_error(run_pipe(["--model", str(tmp_path / "nowhere")], ["hi"]))
    assert "nowhere" in err
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    weights = broken / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in _one_line_error(run_pipe(["--model", str(broken)], ["hi"]))
    (broken / "manifest.json").unlink()
    assert "manifest" in _one_line_error(run_pipe(["--model", str(broken)], ["hi"]))


def test_bad_safety_config_and_unavailable_device_give_one_line(bundle, tmp_path) -> None:
    bad = tmp_path / "crisis.json"
    bad.write_text('{"fr": ["Appelez le 3114."]}', encoding="utf-8")  # no "default" entry
    assert "default" in _one_line_error(run_pipe(["--model", str(bundle), "--safety-config", str(bad)], ["hi"]))
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "cuda" in _one_line_error(run_pipe(["--model", str(bundle), "--device", "cuda"], ["hi"]))


def test_no_model_loads_the_shipped_default(monkeypatch) -> None:
    from star_runtime.bundle import load_manifest
    from star_runtime.runtime import default_bundle

    monkeypatch.delenv("STAR_BUNDLE", raising=False)
    shipped = default_bundle()
    assert shipped is not None, "star_runtime/data/default_bundle is missing (star-chat without --model runs it)"
    manifest = load_manifest(shipped)  # every file present, sizes and sha256 as exported
    assert manifest["precision"] == "int8"
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 30e6  # the issue's ~30 MB bound
    card = (shipped / "README.md").read_text(encoding="utf-8")
    assert "CC BY-NC 4.0" in card and "random weights" in card
    done = run_pipe([], ["hello"])
    assert done.returncode == 0 and "reply" in json.loads(done.stdout)


def test_no_model_anywhere_says_how_to_build_one(monkeypatch, tmp_path) -> None:
    from star_runtime import chat, runtime

    monkeypatch.setattr(runtime, "PACKAGED_BUNDLE", ("data", "no-such-bundle"))
    monkeypatch.delenv("STAR_BUNDLE", raising=False)
    assert runtime.default_bundle() is None
    with pytest.raises(chat.ChatError) as err:
        chat.load_runtime(chat.build_parser().parse_args([]))
    assert all(hint in str(err.value) for hint in ("star-train", "star-export", "--model"))
