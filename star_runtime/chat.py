"""star-chat: talk to a STAR bundle in a terminal, or drive it line by line from a program.

    star-chat [--model BUNDLE] [--device cpu|cuda] [--seed N] [--situation TEXT] [--greedy]
              [--show-probs] [--timings] [--safety-config FILE] [--locale L]

Which bundle: `--model BUNDLE`; else the runtime's default bundle (`star_runtime.runtime
.default_bundle`: `$STAR_BUNDLE`, else `star_runtime/data/default_bundle/`, the trained STAR int8
bundle installed with the package). With none of them star-chat prints one line saying how to
build a bundle (star-train, then star-export); `--model ""` is refused, not read as "none". A
missing or broken bundle, an unusable device or a bad `--safety-config` file is one line on
stderr too. Exit codes (star_runtime.cli): 0 a normal end, 2 one of those problems or bad
arguments, 1 stdout closed or gone, 130 Ctrl-C while loading or in the non-interactive mode.

Nothing the bundle, the model or the user supplied reaches the terminal with control characters
in it: manifest strings, replies, labels and echoed input go through `star_runtime.terminal
.printable` (the JSON lines too: their "reply" and labels are the text a person would see).

Safety comes from the runtime (`star_runtime.safety` inside `Conversation.reply`): a message in
crisis is answered with a fixed message and the crisis resources of `--locale` from
`--safety-config` (default: the built-in list), a model reply that encourages harm is replaced by
that message, and both come back with `Reply.escalated` set. star-chat only shows them.

Two modes, chosen by whether stdin is a terminal:

- Interactive (stdin is a TTY). A banner names the bundle (path, model config from its manifest),
  the device, and says that this is a support tool, not a substitute for professional help. Reply
  text streams as the runtime passes it on (its `on_token` callback gets only text the safety
  screen has passed, so nothing on screen is ever erased); each reply ends with a line giving its
  strategy, with its timings under `--timings`, and the strategy probabilities follow under
  `--show-probs`. An escalated reply is shown in a red panel; a situation in crisis (`--situation`
  or `/situation`) gets that panel as soon as it is set. Lines are read with GNU readline where
  Python has it, so a paste longer than the terminal's 4,095-character line limit is read whole;
  without readline a line that reaches the limit is refused with a message saying it was too long
  (after the safety check of what arrived). Commands: /help, /reset, /situation TEXT,
  /strategy, /save FILE, /quit. Ctrl-C during a reply ends that reply (the callback returns False)
  and the session goes on; Ctrl-C or Ctrl-D at the prompt ends the session with exit code 0.
  Nothing is written to disk unless /save asks (a transcript: star_runtime/transcript.py).
- Non-interactive (stdin is a pipe or a file). Every input line is one message of one
  conversation, and every input line gets exactly one JSON line on stdout, flushed at once, so a
  program can pair outputs with inputs and wait for each:
  `{"reply", "strategy", "strategy_probs", "escalated", "timings"}` (star_runtime.transcript
  .reply_record), or `{"error": "..."}` for a line the runtime refuses: an empty or
  whitespace-only line gets `{"error": "empty message"}` rather than being skipped, to keep the
  pairing, and binary data `{"error": "binary data, not text: ..."}`. Commands are not read
  there (a line starting with "/" is a message), and nothing but the JSON lines goes to stdout
  (no banner). Input and output are UTF-8 whatever the locale; undecodable bytes become U+FFFD.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from star_runtime import DeviceError, Reply, Runtime
from star_runtime.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_version
from star_runtime.decoding import NonFiniteOutputError, Timings
from star_runtime.runtime import BUNDLE_ENV
from star_runtime.safety import SafetyPolicy
from star_runtime.terminal import printable
from star_runtime.transcript import Transcript, reply_record

# A terminal in canonical mode keeps at most 4,095 characters of a line (Linux's N_TTY_BUF_SIZE
# of 4,096, less the newline) and drops the rest without a word.
TTY_LINE_LIMIT = 4095

DISCLAIMER = (
    "STAR is an automated support tool, not a clinician, and not a substitute for professional "
    "help. If you or someone else is in danger, contact your local emergency services."
)

COMMANDS = {
    "/help": "show this list",
    "/reset": "start a new conversation (same situation and seed)",
    "/situation TEXT": "set the situation and start a new conversation (alone: show it)",
    "/strategy": "show the last reply's strategy probabilities",
    "/save FILE": "write this session's transcript to FILE as JSON",
    "/quit": "end the session (so do Ctrl-D and Ctrl-C at the prompt)",
}


class ChatError(Exception):
    """A problem the user can fix (no bundle, a broken one, a bad safety file): one line, exit 2."""


# --------------------------------------------------------------------------------------------
# Choosing and loading the bundle
# --------------------------------------------------------------------------------------------


def load_runtime(args: argparse.Namespace, threads: int | None = None) -> Runtime:
    """Open the bundle the arguments name (--model, --device, --safety-config, --locale), with
    their safety policy and `threads` intra-op threads (None: one per core); failures become
    ChatError. star-serve opens its bundle with this too."""
    if args.model is not None and not args.model.strip():
        raise ChatError("--model is empty: name a bundle folder, or leave --model out for the default bundle")
    path = None if args.model is None else Path(args.model).expanduser()
    try:
        safety = SafetyPolicy.load(args.safety_config, args.locale)
    except (OSError, ValueError) as err:  # SafetyConfigError names the file and the problem
        raise ChatError(f"{err}; fix the file, or leave --safety-config out for the built-in crisis lines") from None
    try:
        return Runtime.load(path, device=args.device, threads=threads, safety=safety)
    except DeviceError as err:  # says which device or export to use
        raise ChatError(str(err)) from None
    # BundleError is a ValueError whose message names the folder and the problem.
    except (OSError, ValueError) as err:
        hint = ("" if path is None
                else "; pass --model with a bundle folder star-export wrote, or leave it out for the default")
        raise ChatError(f"{err}{hint}") from None


# --------------------------------------------------------------------------------------------
# Non-interactive mode: JSON lines
# --------------------------------------------------------------------------------------------


def run_pipe(rt: Runtime, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """One JSON line out for every line in (module docstring)."""
    conv = rt.conversation(situation=args.situation, seed=args.seed, do_sample=False if args.greedy else None)
    for line in stdin:
        try:
            out = printable_record(reply_record(conv.reply(line.rstrip("\r\n"))))
        # ValueError: the runtime refuses the message ("empty message"); NonFiniteOutputError:
        # the bundle's logits are NaN. Either way this line gets its one answer.
        except (ValueError, NonFiniteOutputError) as err:
            out = {"error": printable(err)}
        stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        stdout.flush()  # the program driving us waits for this line before it sends the next
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Interactive mode
# --------------------------------------------------------------------------------------------


class Session:
    """The interactive loop: read a line, run a command or reply to it with streamed tokens."""

    def __init__(self, rt: Runtime, args: argparse.Namespace, console: Console) -> None:
        self.rt, self.args, self.console = rt, args, console
        self.situation: str | None = args.situation
        self.transcript = Transcript(model=str(Path(rt.path).resolve()), device=rt.device)
        self.new_conversation()

    def new_conversation(self) -> None:
        self.conv = self.rt.conversation(situation=self.situation, seed=self.args.seed,
                                         do_sample=False if self.args.greedy else None)
        self.transcript.new_conversation(self.situation, self.args.seed)
        self.last_reply: Reply | None = None
        if (opening := self.conv.situation_reply()) is not None:  # the situation is a crisis
            self.last_reply = opening
            self.transcript.add_turn("(situation)", opening)
            self.show(opening, stopped=False)

    def run(self) -> int:
        """Until /quit, Ctrl-D or Ctrl-C outside a reply; always exit code 0."""
        try:
            import readline  # noqa: F401  input() then reads in non-canonical mode: no line limit
        except ImportError:
            readline = None
        try:
            while True:
                line = self.console.input("[bold green]you[/]> ")
                if readline is None and len(line) >= TTY_LINE_LIMIT:
                    self.too_long(line)
                elif line.strip().startswith("/"):
                    if not self.command(line.strip()):
                        return EXIT_OK
                elif line.strip():
                    self.say(line)
        except (EOFError, KeyboardInterrupt):
            self.console.print()
            return EXIT_OK

    def too_long(self, line: str) -> None:
        """A line the terminal may have cut at its limit: checked for a crisis, else refused."""
        verdict = self.rt.safety.check_user(line)
        if verdict.escalate:
            self.say(line)
            return
        self.console.print(Text(f"that message reached the terminal's line limit ({TTY_LINE_LIMIT:,} characters) "
                                "and may have been cut; please send it in shorter parts", style="red"))

    def command(self, line: str) -> bool:
        """Run one command; False means end the session."""
        name, *rest = line.split(maxsplit=1)
        arg = rest[0].strip() if rest else ""
        echo = self.console.print
        if name == "/quit":
            return False
        if name == "/help":
            table = Table.grid(padding=(0, 2))
            for cmd, what in COMMANDS.items():
                table.add_row(Text(cmd, style="bold"), what)
            echo(table)
        elif name == "/reset":
            self.new_conversation()
            echo("[dim]new conversation[/]")
        elif name == "/situation" and arg:
            self.situation = arg
            self.new_conversation()
            echo("[dim]situation set; new conversation[/]")
        elif name == "/situation":
            echo(Text.assemble(("situation: ", "dim"), printable(self.situation or "(none)")))
        elif name == "/strategy":
            if self.last_reply is None:
                echo("[dim]no reply yet in this conversation[/]")
            elif not self.last_reply.strategy_probs:
                echo("[dim]the last reply came from the safety layer; the model did not run[/]")
            else:
                echo(probs_table(self.last_reply.strategy_probs))
        elif name == "/save" and arg:
            try:
                path = self.transcript.save(arg)
            except OSError as err:
                echo(Text(printable(f"cannot save to {arg}: {err.strerror or err}"), style="red"))
            else:
                echo(Text(printable(f"transcript saved to {path}"), style="dim"))
        elif name == "/save":
            echo("[red]usage: /save FILE[/]")
        else:
            echo(Text.assemble((f"unknown command {printable(name)}", "red"), "; /help lists them"))
        return True

    def say(self, text: str) -> None:
        """Reply to `text`: print the text the runtime passes on as it comes, then the footer."""
        stop = threading.Event()
        shown: list[str] = []

        def on_token(piece: str) -> bool:
            if not shown:
                self.console.print(Text("star", style="bold cyan"), "> ", sep="", end="")
            shown.append(piece)
            self.console.print(Text(printable(piece, newlines=True)), end="", soft_wrap=True)
            self.console.file.flush()
            return not stop.is_set()  # False ends the reply at this piece

        try:
            with _ctrl_c_sets(stop):
                reply = self.conv.reply(text, on_token=on_token)
        except (ValueError, NonFiniteOutputError) as err:  # a refused message, or a broken bundle
            self.console.print(Text(printable(err), style="red"))
            return
        finally:
            if shown:
                self.console.print()
        self.last_reply = reply
        self.transcript.add_turn(text, reply)
        self.show(reply, stopped=stop.is_set(), streamed=bool(shown))

    def show(self, reply: Reply, *, stopped: bool, streamed: bool = False) -> None:
        text = printable(reply.text, newlines=True)
        if reply.escalated:
            self.console.print(Panel(Text(text), title="please reach out to a person",
                                     border_style="bold red", title_align="left"))
        elif not streamed:
            self.console.print(Text.assemble(("star", "bold cyan"), "> ", text))
        if reply.escalation is not None and reply.escalation.trigger == "situation":
            footer = "escalated: the situation describes a crisis; the model did not run"
        elif reply.strategy is None:
            footer = "escalated: the safety layer answered; the model did not run"
        else:
            footer = f"strategy: {printable(reply.strategy)} ({reply.strategy_probs[reply.strategy]:.0%})"
            if reply.escalated:
                footer += " · escalated: the safety screen replaced the model's reply"
        if stopped:
            footer += " · stopped (Ctrl-C)"
        if self.args.timings:
            footer += " · " + format_timings(reply.timings)
        self.console.print(Text(footer, style="dim"))
        if self.args.show_probs and reply.strategy_probs:
            self.console.print(probs_table(reply.strategy_probs))


class _ctrl_c_sets:
    """While active, Ctrl-C sets `event` (the reply stops at its next token) instead of raising."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGINT, lambda signum, frame: self.event.set())

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)


def probs_table(probs: dict[str, float]) -> Table:
    """The strategy distribution, most likely first, with a bar per strategy."""
    table = Table(show_header=False, box=None, padding=(0, 1))
    for label, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(printable(label)), f"{p:6.1%}", "█" * round(20 * p))
    return table


def printable_record(record: dict) -> dict:
    """A reply record (transcript.reply_record) with its reply and labels made `printable`."""
    return {**record, "reply": printable(record["reply"], newlines=True),
            "strategy": None if record["strategy"] is None else printable(record["strategy"]),
            "strategy_probs": {printable(k): v for k, v in record["strategy_probs"].items()}}


def format_timings(t: Timings) -> str:
    """'412 ms; 40 tokens, 9.1 ms/token, first at 51 ms' (Reply.timings)."""
    text = f"{t.reply_ms:.0f} ms"
    if t.token_ms:
        text += f"; {len(t.token_ms)} tokens, {t.per_token_ms:.1f} ms/token, first at {t.first_token_ms:.0f} ms"
    return text


def banner(rt: Runtime) -> Panel:
    """Which model, on which device, and what it is not."""
    cfg, precision = rt.manifest["model_config"], rt.manifest["precision"]
    star = "STAR on" if cfg.get("star", {}).get("use_star", True) else "STAR off (BlenderBot-Joint)"
    head = "" if rt.spec.output_size == rt.spec.vocab_size else f" (replies use the {rt.spec.output_size:,} it was trained on)"
    summary = printable(f"{cfg['model_type']}, {precision}, d_model {cfg['d_model']}, {cfg['encoder_layers']}+"
                        f"{cfg['decoder_layers']} layers, vocabulary {cfg['vocab_size']:,}{head}, {star}")
    body = Text.assemble(("model   ", "bold"), printable(Path(rt.path).resolve()), "\n", ("config  ", "bold"), summary, "\n",
                         ("device  ", "bold"), rt.device, "\n\n", (DISCLAIMER, "yellow"), "\n\n",
                         ("/help lists the commands; Ctrl-D or /quit ends the session", "dim"))
    return Panel(body, title="star-chat", border_style="cyan", title_align="left")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _seed(text: str) -> int:
    if not text.isdigit():  # numpy's generators take 0 .. 2**128 - 1
        raise argparse.ArgumentTypeError(f"a seed is a non-negative integer, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star-chat",
        description="Chat with a STAR emotional-support bundle. Interactive on a terminal; with stdin "
        "from a pipe or file, one message per line in and one JSON object per line out.",
    )
    p.add_argument("--model", metavar="BUNDLE",
                   help=f"bundle folder from star-export (default: ${BUNDLE_ENV}, else the installed default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=_seed, default=None, help="sampling seed: same seed and messages, same replies")
    p.add_argument("--situation", metavar="TEXT", default=None, help="the seeker's situation, read before the dialogue")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--show-probs", action="store_true", help="show the strategy probabilities after each reply")
    p.add_argument("--timings", action="store_true", help="show how long each reply took")
    p.add_argument("--safety-config", metavar="FILE", default=None,
                   help='crisis resources: a JSON object of locale -> list of lines, with a "default" entry')
    p.add_argument("--locale", metavar="L", default="default",
                   help="which locale's crisis resources to give (e.g. en-GB; falls back to the language, then default)")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None or sys.stdin is None:  # started with `>&-` or `<&-`: Python sets them to None
        if sys.stderr is not None:
            print(f"star-chat: error: {'stdout' if sys.stdout is None else 'stdin'} is closed; run star-chat "
                  "with a terminal, a pipe or a file there", file=sys.stderr)
        return EXIT_FAILURE
    args = build_parser().parse_args(argv)
    interactive = sys.stdin.isatty()
    # Undecodable input becomes U+FFFD instead of a UnicodeDecodeError; a pipe speaks UTF-8
    # whatever the locale, so emoji survive both ways.
    sys.stdin.reconfigure(errors="replace", **({} if interactive else {"encoding": "utf-8"}))
    try:
        try:
            rt = load_runtime(args)
        except ChatError as err:
            # one line, whatever onnxruntime says
            print("star-chat: error:", *printable(err).split(), file=sys.stderr)
            return EXIT_USAGE
        if not interactive:
            sys.stdout.reconfigure(encoding="utf-8")
            return run_pipe(rt, args, sys.stdin, sys.stdout)
        console = Console(highlight=False)
        console.print(banner(rt))
        return Session(rt, args, console).run()
    except KeyboardInterrupt:  # while loading, or in pipe mode
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our stdout went away (`star-chat < in | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
