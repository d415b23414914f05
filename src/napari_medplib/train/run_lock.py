"""One trainer per run folder: ``medplib train`` holds ``RUN/LOCK`` (its pid) while it trains.

Two trainers on one folder (a second terminal, a ``kill`` that hit a wrapping shell instead of Python)
both write the step checkpoints, the stage folders and ``log.jsonl``, and which weights survive is
luck. A lock left by a process that no longer runs (a crash, a power cut) is taken over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "LOCK"


class RunFolderBusy(ValueError):
    """Another live ``medplib train`` holds the run folder."""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir/LOCK`` for the duration; raise RunFolderBusy if a live trainer has it."""
    path = Path(run_dir) / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _owner(path)
            if owner is None or _pid_alive(owner):
                raise RunFolderBusy(
                    f"another `medplib train` (pid {owner if owner is not None else 'unknown'}) is training in "
                    f"{Path(run_dir)}; stop it first or give another --run folder (if none is running, "
                    f"delete {path})"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    try:
        yield path
    finally:
        if _owner(path) == os.getpid():
            path.unlink(missing_ok=True)
