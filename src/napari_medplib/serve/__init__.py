"""Serve one resident model over HTTP (`medplib serve`) and use it from anywhere (`RemoteSession`).

A laptop's napari, the CLI or a script talks to the model on a lab's GPU machine through the same
interface as a local `Session`: ``Session.connect(url, token=...)`` returns a `RemoteSession`.

Modules, one job each: ``wire`` (arrays, images, regions and replies as JSON-safe data, no pickle),
``tokens`` (bearer tokens and their 0600 files), ``limits`` (request caps, rate limit),
``gpu`` (the single model consumer behind a bounded queue), ``server`` (the ASGI app and uvicorn;
the only module that imports the web stack), ``client`` (`RemoteSession`, httpx + SSE) and ``cli``
(the ``serve`` subcommand's parser). Importing this package imports none of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RemoteSession"]


def __getattr__(name: str) -> Any:
    if name == "RemoteSession":
        from .client import RemoteSession

        return RemoteSession
    raise AttributeError(name)
