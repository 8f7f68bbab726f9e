"""Files that survive a crash: written whole under a temporary name, fsynced, renamed, and
the directory fsynced — a reader (or a restart) sees the old file or the new one, never half
of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new entries are durable (each created level's parent fsynced)."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


@contextmanager
def atomic_file(path: Path, tmp: Path | None = None) -> Iterator[BinaryIO]:
    """Write ``path`` through ``tmp`` (default ``.<name>.<pid>.tmp`` beside it): fsynced,
    renamed into place, the directory fsynced; ``tmp`` removed if anything fails."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically (temporary file in the same directory)."""
    with atomic_file(path) as f:
        f.write(data)


__all__ = ["atomic_file", "fsync_dir", "make_dirs", "replace_file"]
