"""repghost.files.atomic_write: all or nothing, flushed to disk, the user's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from repghost.files import atomic_write, default_file_mode


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert default_file_mode() == mode
        path = atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("x"))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_content_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    """os.fsync runs (for real) on the temporary file before it replaces the target, then on the folder."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").write(b"data"))
    assert events.index("fsync") < events.index("replace")  # the file's data first
    assert events[-1] == "fsync"  # then the folder's entry
    assert (tmp_path / "f.bin").read_bytes() == b"data"


def test_a_failed_write_leaves_the_old_file_and_no_fragment(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_bad_targets_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        atomic_write(tmp_path / "missing" / "f", lambda tmp: None)
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, lambda tmp: None)


def test_published_folder_appears_whole_or_not_at_all(tmp_path):
    from repghost.files import published_folder

    target = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        with published_folder(target) as out:
            (out / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []  # nothing published, no staging left
    with published_folder(target) as out:
        (out / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with published_folder(target) as out:  # a folder already there is replaced whole
        (out / "b.txt").write_text("two")
    assert os.listdir(target) == ["b.txt"] and os.listdir(tmp_path) == ["set"]
    with published_folder(target, same=lambda folder: (folder / "b.txt").is_file()) as out:
        (out / "c.txt").write_text("late copy")  # the target already holds the same set: kept, copy dropped
    assert os.listdir(target) == ["b.txt"] and os.listdir(tmp_path) == ["set"]
