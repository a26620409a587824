"""Writing files safely: atomically, durably, with the user's permissions.

Every file this package writes for a user (checkpoints, exports, reports, metrics) goes through
:func:`atomic_write` (the one exception is a run's ``train.log``, a log appended line by line): the content is written to a temporary file beside the target, flushed to
disk, given the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask;
``tempfile.mkstemp`` creates ``0o600`` files), and renamed over the target. A reader, or a run
killed half-way, sees the old file or the new one, never a torn one. Folders of files (the data
sets ``repghost detect fetch`` and the synthetic set write) are published the same way, whole, by
:func:`published_folder`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

__all__ = ["atomic_write", "published_folder", "default_file_mode", "PathLike"]

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


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            _fsync_file(str(path))


@contextmanager
def published_folder(target: PathLike, *, same: Optional[Callable[[Path], bool]] = None) -> Iterator[Path]:
    """A fresh hidden folder beside ``target`` to fill; when the block ends without error its files
    are flushed to disk and it is renamed to ``target``, so readers see the old folder or the whole
    new one, never a half-written one. A folder already at ``target`` is moved aside and deleted
    after the rename. ``same(target)``: whether ``target`` already holds what was being written (a
    concurrent writer finished first); then the new copy is dropped. On error the staging folder is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # mode 0o777 less the umask, as for any folder
    try:
        yield staging
        _fsync_tree(staging)
        for _attempt in range(3):
            try:
                os.rename(staging, target)  # replaces an empty folder too
                break
            except OSError:
                if not target.exists():
                    raise
            if same is not None and same(target):
                break  # a concurrent writer published the same content: ours is dropped below
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, old)
            except FileNotFoundError:
                continue
            try:
                os.rename(staging, target)
            finally:
                shutil.rmtree(old, ignore_errors=True)
            break
        else:
            raise OSError(f"could not publish the folder {target}")
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
