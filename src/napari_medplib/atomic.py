"""Atomic file writes: write a temporary file in the target folder, then rename it over the target.

A write that fails half-way (a value that cannot be serialised, a full disk, an interrupted
process) leaves the existing file exactly as it was, and no partly written file under the target
name. The temporary file lives in the same folder so that the final ``os.replace`` is a rename on
one file system (atomic on POSIX and Windows); it is removed when the write fails.

    with atomic_write(path, "w", encoding="utf-8") as handle:   # a file object
        json.dump(document, handle)
    with atomic_path(path) as tmp:                              # a path, for tools that want one
        tifffile.imwrite(tmp, labels)
    atomic_write_text(path, text); atomic_write_bytes(path, data)

``atomic_path`` keeps the target's suffixes on the temporary name (``.a1b2.labels.ome.tif``), since
some writers choose the format from them. Folders are not created.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


def _temporary(path: Path, keep_suffix: bool) -> Path:
    name = path.name
    if keep_suffix:
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=f".{name}", dir=path.parent)
    else:
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(temporary)


def _finish(temporary: Path, path: Path) -> None:
    """fsync the finished temporary file, give it the target's permissions, rename it over the target."""
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:  # no old file: the usual permissions for a new file
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    with contextlib.suppress(OSError):
        os.chmod(temporary, mode)
    with contextlib.suppress(OSError), open(temporary, "rb") as done:
        os.fsync(done.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally it replaces ``path``."""
    path = Path(path)
    temporary = _temporary(path, keep_suffix)
    try:
        yield temporary
        _finish(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``mode`` "w" or "wb"); replace ``path``
    with it when the block ends normally, discard it when the block raises."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write writes whole files; mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, keep_suffix=False) as temporary, open(temporary, mode, **open_kwargs) as handle:
        yield handle
        handle.flush()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding=encoding, newline=newline) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)
