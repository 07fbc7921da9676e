"""What star-train and star-eval share: default data paths, checked option types, flag groups,
seeding, and turning a user's mistake into one line on stderr and a non-zero exit.

Exit codes follow star_runtime.cli: 2 for what the user can fix (CliError and the errors of
checkpoints, data, tokenizers, devices, bundles), 1 for a failure of the machine (an OSError such
as a full disk, or `Failure`), 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from star_runtime.bundle import BundleError
from star_runtime.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, add_version
from star_runtime.terminal import printable
from star_runtime.tokenizer import Tokenizer, TokenizerError
from star_training.checkpoint import CheckpointError
from star_training.data import DataError
from star_training.distributed import TorchDeviceError

# An editable checkout sits beside ../shared/data (the licensed files are never in the repo).
SHARED_DATA = Path(os.environ.get("STAR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_DATA = SHARED_DATA / "esconv"
DEFAULT_TOKENIZER = SHARED_DATA / "blenderbot_small-90M"



class CliError(Exception):
    """A problem the user can fix; the message is printed as is, without a traceback (exit 2)."""


class Failure(Exception):
    """A correct command that the machine could not finish (exit 1); the message says what to do."""


def os_error_message(err: OSError, then: str = "run the same command again") -> str:
    """One line for an OSError while writing or reading: what, where, and what to do next."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space, then {then}"
    return f"{err.strerror or err}{where}; fix that, then {then}"


# -- option types: argparse turns their ValueError into "argument --x: invalid ... value" --------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, not {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1): a probability, a beta of AdamW, a dropout rate."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--data, --device and --seed, named and checked the same way in every tool."""
    parser.add_argument(
        "--data", type=Path, default=None,
        help=f"a folder of ESConv split files (train/valid/test.txt) or an ESConv.json "
        f"(default: {DEFAULT_DATA} when it exists)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="auto: CUDA (bf16 autocast) when present, else CPU (default: auto)")
    parser.add_argument("--seed", type=nonnegative_int, default=None, help="random seed (default: 42)")
    add_version(parser)


def resolve_data_path(path: Path | None) -> Path:
    """The given data path, or the shared ESConv folder; a clear CliError when neither exists."""
    if path is None:
        if not DEFAULT_DATA.exists():
            raise CliError(
                f"no --data given and the default ESConv folder {DEFAULT_DATA} does not exist; "
                "pass --data with a folder of train/valid/test.txt files or an ESConv.json"
            )
        return DEFAULT_DATA
    if not path.exists():
        raise CliError(f"--data {path} does not exist; pass a folder of train/valid/test.txt files or an ESConv.json")
    return path


def check_own_outputs(out: Path, names: tuple[str, ...], record: str, keys: set[str], prog: str) -> None:
    """CliError if OUT holds any of the files `names` that `prog` would replace but did not write.

    A folder is `prog`'s when its JSON file `record` (one of `names`) holds all of `keys`: then
    its files may be replaced by a new run; a folder without any of `names` is always fine.
    """
    present = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return
    try:
        ours = keys <= set(json.loads((out / record).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        ours = False
    if not ours:
        raise CliError(f"{out} holds {', '.join(present)} that {prog} did not write, so it will not replace them; "
                       "choose another --out")


def slug(text: str) -> str:
    """`text` (a model name such as "gpt-4o-mini" or "org/model:q4") as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body`, turning the errors a user can cause into `prog: error: ...` and an exit code."""
    try:
        return body()
    except (CliError, CheckpointError, TorchDeviceError, BundleError) as exc:
        print(f"{prog}: error: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, TokenizerError) as exc:  # their messages name the file and the problem
        then = "fix it or pass another --data" if isinstance(exc, DataError) else (
            "pass --tokenizer with a BlenderBot-Small tokenizer folder (vocab.json, merges.txt)")
        print(f"{prog}: error: {printable(exc)}; {then}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as exc:
        print(f"{prog}: error: {printable(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a full disk, a folder that cannot be written: nothing was half-written
        print(f"{prog}: error: {printable(os_error_message(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextmanager
def llm_errors() -> Iterator[None]:
    """Errors of an LLM endpoint as the exit-code rule has them: a wrong request (URL, key,
    model) is the user's (CliError, 2), a server that never answered is a Failure (1)."""
    from star_training.llm_client import LLMRequestError, LLMUnavailable  # only the LLM tools need httpx

    try:
        yield
    except LLMRequestError as exc:
        raise CliError(str(exc)) from None
    except LLMUnavailable as exc:
        raise Failure(str(exc)) from None


def find_tokenizer(explicit: Path | None, *folders: str | Path | None) -> Path:
    """The tokenizer folder of a command: --tokenizer if given (Tokenizer.from_dir names what is
    missing there), else the first of `folders` (a model's, an --init's) that holds tokenizer
    files, else the default; CliError when none does."""
    if explicit is not None:
        return Path(explicit)
    searched = [Path(f) for f in folders if f is not None] + [DEFAULT_TOKENIZER]
    for folder in searched:
        if (folder / "vocab.json").is_file():
            return folder
    raise CliError(f"no --tokenizer given and no tokenizer files in {' or '.join(map(str, searched))}; "
                   "pass --tokenizer DIR")


def load_tokenizer(explicit: Path | None, model_folder: Path) -> Tokenizer:
    """The tokenizer `find_tokenizer` finds for a command on the model in `model_folder`."""
    return Tokenizer.from_dir(find_tokenizer(explicit, model_folder))
