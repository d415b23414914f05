"""Example questions for the chosen image layer: its kind guessed cheaply, the chips kept up to date.

`ExampleQuestions.update` is called whenever the layer pickers change. The kind is guessed from a strided
subsample (`suggested_questions.image_kind`): at once for an in-memory numpy plane (a few hundred thousand
pixels at most, whatever the plane's size), in a thread worker for anything that reads from disk or
computes (dask, zarr, memory maps), so the Qt thread never waits on a big plane. Multiscale data is read at
its coarsest level. A layer already looked at is not looked at again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..suggested_questions import image_kind, suggested_questions
from .chat import ChatPane
from .layers import layer_key, layer_kind


def kind_source(layer: Any) -> tuple[Any, bool]:
    """(the array to guess the layer's kind from, rgb): the coarsest level of multiscale data."""
    data = layer.data[-1] if getattr(layer, "multiscale", False) else layer.data
    return data, bool(getattr(layer, "rgb", False))


def in_memory(data: Any) -> bool:
    """Whether strided reads of ``data`` are cheap on the Qt thread (a numpy array in memory)."""
    return isinstance(data, np.ndarray) and not isinstance(data, np.memmap)


def kind_job(data: Any, rgb: bool) -> str:
    """`image_kind` in a worker thread; a plane that cannot be read is "unknown" (no error shown: the
    examples are a hint, and asking a question reports any real problem)."""
    try:
        return image_kind(data, rgb)
    except Exception:  # any read error only loses the hint
        return "unknown"


class ExampleQuestions:
    """Keeps ``chat``'s example chips and placeholder in step with the chosen image layer."""

    def __init__(self, chat: ChatPane) -> None:
        self.chat = chat
        self.kind: str | None = None  # the chosen layer's kind (None: no image, or not known yet)
        self._key: tuple | None = None
        self._worker: Any = None

    def update(self, layer: Any | None) -> None:
        """Show the examples for ``layer`` (None or not an image: none)."""
        if layer is None or layer_kind(layer) != "image":
            self._key, self.kind = None, None
            self.chat.set_examples([])
            return
        data, rgb = kind_source(layer)
        key = (layer_key(layer), id(data), rgb)
        if key == self._key:
            return
        self._key = key
        if in_memory(data):
            self._show(key, kind_job(data, rgb))
            return
        from .workers import start

        self.kind = None
        self.chat.set_examples([])  # the previous layer's examples would mislead meanwhile
        self._worker = start(kind_job, data, rgb, desc="MedPLIB: example questions",
                             on_return=lambda kind: self._show(key, kind))

    def _show(self, key: tuple, kind: str) -> None:
        if key != self._key:  # another layer was chosen meanwhile
            return
        self.kind = kind
        try:
            self.chat.set_examples(suggested_questions(kind))
        except RuntimeError:  # the dock was closed before the worker returned
            pass
