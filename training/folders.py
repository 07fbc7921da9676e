"""Files and folders written atomically: written under a temporary name, then renamed into place.

POSIX rename cannot replace a non-empty folder, so an existing one is first renamed aside
(`.NAME.old`), the new one renamed in, and the old one deleted. A crash can only leave the aside
copy, never a half-written folder under the real name; `existing_folder` finds that copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _aside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def write_folder_atomically(dest: Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(tmp)` to write the folder's files into `tmp`, then make `tmp` become `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _aside(dest)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def existing_folder(dest: Path) -> Path | None:
    """`dest` if it exists, else the copy a crash mid-replace left aside, else None."""
    dest = Path(dest)
    for candidate in (dest, _aside(dest)):
        if candidate.is_dir():
            return candidate
    return None


def save_figure_atomically(fig, png: Path, *, dpi: int = 100) -> None:
    """Write a matplotlib figure to `png` through a temporary file, then close the figure."""
    import matplotlib.pyplot as plt

    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    os.replace(tmp, png)
