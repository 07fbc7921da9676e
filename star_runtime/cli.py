"""What every command of the project shares: the exit-code rule and `--version`.

Exit codes of star-chat, star-serve, star-train, star-eval, star-judge, star-analyze, star-export,
the `python -m` tools (star_export.dequantize, .quality, .safety_encoder) and benchmarks' scripts that set one:

    0    done
    1    FAILURE: a correct command could not finish because of the machine -- the disk is full,
         a file cannot be written, stdout is closed or went away, the device failed. The
         message says what failed; rerunning after fixing that is enough.
    2    USER ERROR: the command line or something it names (a bundle, a checkpoint, a config,
         the data, an output that must not be replaced) is wrong or missing, and the message
         says what to change. argparse's own usage errors are 2 as well.
    130  interrupted by Ctrl-C (128 + SIGINT, what a shell reports)

Errors are one line on stderr, `PROG: error: ...`, never a traceback.
"""

from __future__ import annotations

import argparse
from importlib import metadata

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DISTRIBUTION = "star-esc"


def version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown" when run from a
    source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: print `PROG VERSION` and exit 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
