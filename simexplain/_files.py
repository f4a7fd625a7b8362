"""Writing files and folders atomically: a reader sees the old one or the complete new one,
never a part."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Union

__all__ = ["atomic_write", "swap_into_place"]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``.

    The temporary file is hidden (``.name.<pid>.<random>.tmp``), flushed and synced before
    the rename (``os.replace``, atomic on POSIX and Windows), and removed if ``write`` fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_into_place(building: PathLike, out: PathLike) -> None:
    """Rename the folder ``building`` to ``out``; an old ``out`` is moved aside first (and put
    back if the rename fails), then deleted."""
    building, out = Path(building), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(building, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
