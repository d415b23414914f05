"""What ``ask``/``segment`` return: `Reply`, `SegmentResult`, and the `AskStream` iterator."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Reply:
    """One answer. ``masks``: one bool (H, W) per ``<SEG>`` at image resolution, in answer order."""

    text: str
    masks: list[np.ndarray]
    regions: list  # the Regions used, in the caller's order
    question: str
    model: str
    finish_reason: str  # "eos" | "stop_string" | "max_new_tokens" | "cancelled"
    timings: dict[str, float] = field(default_factory=dict)
    expert_share: list[list[float]] | None = None  # per MoE layer, share of answer tokens per expert
    expert_share_mean: list[float] | None = None  # averaged over layers
    warnings: list[str] = field(default_factory=list)  # e.g. regions too small for the model's grid
    empty_regions: list[int] = field(default_factory=list)  # indices into ``regions``
    mask_scores: list[float] = field(default_factory=list)  # SAM's IoU prediction per mask
    token_ids: list[int] = field(default_factory=list)
    image_key: str = ""  # content key of what the model saw (the cache key)
    #: per ``<SEG>``: int32 (H, W) labels, one id per object (1..n, 0 background); empty with instances=False
    instances: list[np.ndarray] = field(default_factory=list)
    #: per ``<SEG>``: the per-object table of its instances (``engine.measure.COLUMNS``)
    tables: list[dict[str, np.ndarray]] = field(default_factory=list)
    #: how-many questions: objects counted by grounding ``count_noun`` and splitting its mask (None otherwise)
    measured_count: int | None = None
    count_noun: str | None = None
    count_labels: np.ndarray | None = None  # the instances that were counted (int32 (H, W))
    #: the model's own words when the engine rewrote ``text`` (a how-many answer states the measured count)
    model_text: str | None = None


@dataclass
class SegmentResult:
    """Direct segmentation: the best mask, and all candidates with SAM's IoU predictions."""

    mask: np.ndarray  # bool (H, W), highest score
    masks: list[np.ndarray]
    scores: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    image_key: str = ""
    #: the best mask measured as one object, label 1 (``engine.measure.COLUMNS``; no rows for an empty mask)
    table: dict[str, np.ndarray] | None = None


def expert_shares(counts) -> tuple[list[list[float]] | None, list[float] | None]:
    """[layers, E] token counts -> (per-layer shares, mean share per expert); None without MoE."""
    if counts is None:
        return None, None
    array = np.asarray(counts.cpu().numpy() if hasattr(counts, "cpu") else counts, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        return None, None
    totals = array.sum(axis=1, keepdims=True)
    shares = np.divide(array, totals, out=np.zeros_like(array), where=totals > 0)
    return shares.tolist(), shares.mean(axis=0).tolist()


_DONE = object()


class AnyEvent:
    """Quacks like a threading.Event for ``is_set``: set when any of the given events is."""

    def __init__(self, *events: threading.Event | None) -> None:
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)



class CancelledSince:
    """Quacks like a threading.Event: set once ``Session.cancel()`` was called after this was made.

    ``Session.cancel()`` counts up; a call compares against the count it saw when it was made, so a
    cancel also reaches calls still waiting for the model lock (an Event cleared by each new call would
    lose it)."""

    def __init__(self, counter: Callable[[], int]) -> None:
        self._counter = counter
        self._seen = counter()

    def is_set(self) -> bool:
        return self._counter() != self._seen


class AskStream:
    """Iterator of text pieces of one answer; ``reply`` is set once it is exhausted.

    The answer is computed in a helper thread (the model lock still serialises it with other calls);
    pieces are handed over through a queue, so they arrive in the iterating thread. Leaving the loop
    early (``break``/``close()``) cancels the generation. Errors are re-raised in the iterating thread.
    """

    def __init__(self, run: Callable[[Callable[[str], None], threading.Event], Reply]) -> None:
        self._run = run
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def _worker(self) -> None:
        try:
            self.reply = self._run(self._queue.put, self._cancel)
        except BaseException as exc:  # handed to the iterating thread
            self.error = exc
        finally:
            self._queue.put(_DONE)

    def __iter__(self) -> Iterator[str]:
        if self._thread is not None:
            raise RuntimeError("an AskStream can be iterated only once")
        self._thread = threading.Thread(target=self._worker, name="medplib-ask-stream", daemon=True)
        self._thread.start()
        try:
            while True:
                item: Any = self._queue.get()
                if item is _DONE:
                    break
                yield item
        finally:
            if self._thread.is_alive():
                self._cancel.set()
                self._thread.join()
        if self.error is not None:
            raise self.error
