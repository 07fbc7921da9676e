"""Files and folders written atomically: written under a temporary name, then renamed into place.

POSIX rename cannot replace a non-empty folder, so an existing one is first renamed aside
(`.NAME.old`), the new one renamed in, and the old one deleted. A crash can only leave the aside
copy, never a half-written folder under the real name; `existing_folder` finds that copy.

What a killed writer leaves, and what `recover_folder` (run before the next write) does with it:

    killed while filling            .NAME.tmp-PID (incomplete), NAME     -> the temp folder removed
    killed between the two renames  .NAME.tmp-PID (complete), .NAME.old  -> the temp folder becomes
                                                                            NAME, the old one goes
    killed before deleting the old  NAME, .NAME.old                      -> .NAME.old removed

Only names this module writes are touched (`.NAME.tmp-<pid>` of a process that is gone, and
`.NAME.old`), never anything else in the folder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from star_runtime.atomic import write_atomically


def _aside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def _alive(pid: int) -> bool:
    """Whether another process with this id runs (its temp folder may still be in use)."""
    if pid == os.getpid():
        return False  # ours: this process has not started writing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def stale_temp_folders(dest: Path) -> list[Path]:
    """`.NAME.tmp-PID` folders beside `dest` whose writer is no longer running."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.tmp-(\d+)")
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir()
                  if (m := pattern.fullmatch(p.name)) and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))))


def recover_folder(dest: Path, complete: Callable[[Path], bool]) -> list[str]:
    """Undo what killed writers of `dest` left (module docstring); returns a line per action.

    complete(folder): whether a folder is a whole one (e.g. a checkpoint that loads): a temp
    folder is put in place only if it is, and only if it is the single candidate.
    """
    dest = Path(dest)
    temps, aside, notes = stale_temp_folders(dest), _aside(dest), []
    if not dest.exists() and aside.is_dir():
        if len(temps) == 1 and complete(temps[0]):  # killed between the renames: the new one is whole
            os.replace(temps[0], dest)
            notes.append(f"{dest}: put in place the complete copy a killed run left in {temps[0].name}")
            temps = []
        else:
            os.replace(aside, dest)
            notes.append(f"{dest}: restored the previous copy a killed run left in {aside.name}")
    for temp in temps:
        shutil.rmtree(temp)
        notes.append(f"{dest.parent}: removed {temp.name}, left by a killed run")
    if dest.exists() and aside.is_dir():
        shutil.rmtree(aside)
        notes.append(f"{dest.parent}: removed {aside.name}, left by a killed run")
    return notes


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
    """Write a matplotlib figure to `png` atomically (star_runtime.atomic), then close the figure."""
    import matplotlib.pyplot as plt

    try:
        write_atomically(png, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)
