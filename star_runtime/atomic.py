"""Files written atomically: a temporary file beside the target, then one rename, so a crash or a
full disk leaves either the old file or the new one, never half of one.

This is the project's one writer of single files; folders (checkpoints) are written by
star_training.folders, which builds on the same temp-then-rename rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    *,
    private: bool = False,
    durable: bool = False,
) -> None:
    """Call `write(tmp)` to create the file's content at `tmp`, a path beside `path`, then
    os.replace it onto `path`.

    `tmp` ends in `path`'s suffix, for writers that choose a format by it (matplotlib). With
    `private`, the file is created with mode 0600 before `write` runs, and os.replace keeps that
    mode: readable by its owner only. With `durable`, the content is fsync'ed before the rename,
    so a power cut after the rename cannot leave an empty file. On any error `path` is left as it
    was, the temporary file is removed and the error is raised (an OSError for the disk).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        if private:
            tmp.unlink(missing_ok=True)  # a leftover of this pid would keep its own mode
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.chmod(tmp, 0o600)  # whatever the umask
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write or the rename failed


def write_text_atomically(
    path: str | os.PathLike[str], text: str, *, private: bool = False, durable: bool = False
) -> None:
    """Write `text` (UTF-8) to `path` atomically; `private` and `durable` as in write_atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), private=private, durable=durable)


def write_bytes_atomically(
    path: str | os.PathLike[str], data: bytes, *, private: bool = False, durable: bool = False
) -> None:
    """Write `data` to `path` atomically; `private` and `durable` as in write_atomically."""
    write_atomically(path, lambda tmp: tmp.write_bytes(data), private=private, durable=durable)
