"""Loaded sessions shared by the dock widget and the grounding function widget.

A MedPLIB model takes gigabytes, so both widgets use one `Session` per (model source, device)
instead of loading their own. A session is not meant for two threads at once (one model, one
cache), so every job holds `lock_for(session)` while it uses it: a second job waits in its own
worker thread, never on the Qt thread.
"""

from __future__ import annotations

import threading
from typing import Any

_SESSIONS: dict[tuple, Any] = {}
_LOCKS: dict[int, threading.Lock] = {}
_GUARD = threading.Lock()


def lock_for(session: Any) -> threading.Lock:
    """The lock that serialises use of ``session`` across worker threads."""
    with _GUARD:
        return _LOCKS.setdefault(id(session), threading.Lock())


def shared(key: tuple) -> Any | None:
    """The session loaded for ``key`` (`settings.session_key`), if any and still open."""
    session = _SESSIONS.get(key)
    if session is not None and getattr(session, "closed", False):
        _SESSIONS.pop(key, None)
        return None
    return session


def remember(key: tuple, session: Any) -> None:
    _SESSIONS[key] = session


def forget(session: Any) -> None:
    """Drop ``session`` from the registry (after it was closed or replaced)."""
    for key in [k for k, s in _SESSIONS.items() if s is session]:
        del _SESSIONS[key]
    with _GUARD:
        _LOCKS.pop(id(session), None)
