"""star_runtime.atomic: the project's one writer of single files."""

from __future__ import annotations

import os
import stat

import pytest

from star_runtime.atomic import write_atomically, write_bytes_atomically, write_text_atomically


def test_text_and_bytes_replace_the_file_and_leave_no_temp(tmp_path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    write_text_atomically(target, "néw\n", durable=True)
    assert target.read_text(encoding="utf-8") == "néw\n"
    write_bytes_atomically(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_private_files_are_mode_0600_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0)  # the most permissive umask: 0600 must still come from the writer
    try:
        write_text_atomically(tmp_path / "private.json", "x", private=True)
        write_text_atomically(tmp_path / "public.json", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public.json").stat().st_mode) == 0o666


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half(tmp) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, half, private=True, durable=True)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_the_temp_file_keeps_the_suffix(tmp_path) -> None:
    seen = []
    write_atomically(tmp_path / "plot.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"png")))
    assert seen == [".png"] and (tmp_path / "plot.png").read_bytes() == b"png"


def test_a_folder_in_the_way_raises_and_leaves_no_temp(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "d", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
