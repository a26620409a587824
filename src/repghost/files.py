"""Writing files safely: atomically, durably, with the user's permissions.

Every file this package writes for a user (checkpoints, exports, reports, metrics) goes through
:func:`atomic_write` (the one exception is a run's ``train.log``, a log appended line by line): the content is written to a temporary file beside the target, flushed to
disk, given the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask;
``tempfile.mkstemp`` creates ``0o600`` files), and renamed over the target. A reader, or a run
killed half-way, sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "default_file_mode", "PathLike"]

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by setting it
    (and putting it back), which leaves a moment where another thread's new file gets mode 0o666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666`` less the process's umask: the mode ``open(path, "w")`` creates files with."""
    return 0o666 & ~_umask()


def _temporary_beside(path: Path) -> str:
    if path.is_dir():
        raise IsADirectoryError(f"output path is a directory: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {parent}")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)``, flush it to disk and move it to ``path``; nothing is left on failure."""
    target = Path(path)
    tmp = _temporary_beside(target)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent if str(target.parent) else Path("."))
    return target
