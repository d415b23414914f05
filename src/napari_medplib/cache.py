"""Bounded caches for what the session computes once per image: embeddings and the LLM's prefix KV.

Entries are keyed by a content hash of what the model sees (the RGB uint8 plane), so a new question or
a new prompt on the same image recomputes nothing, and an edited image never hits a stale entry.
The cache is bounded by an approximate byte budget and evicts the least recently used entries.
No torch import: sizes are read from `nbytes`/`element_size` duck-typing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


def content_key(array: np.ndarray, *extra: Hashable) -> str:
    """A stable key for an array's content (dtype, shape and bytes), plus optional extra parts."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(array.dtype).encode())
    digest.update(repr(array.shape).encode())
    digest.update(memoryview(array).cast("B"))
    for part in extra:
        digest.update(repr(part).encode())
    return digest.hexdigest()


def approx_nbytes(value: Any) -> int:
    """Bytes held by arrays/tensors inside `value` (nested tuples, lists, dicts, dataclass-like objects)."""
    if value is None:
        return 0
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch.Tensor
        return int(value.element_size() * value.nelement())
    if isinstance(value, dict):
        return sum(approx_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(approx_nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(approx_nbytes(v) for v in vars(value).values())
    return 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class LRUCache:
    """A thread-safe LRU mapping bounded by `max_bytes` (and optionally `max_items`)."""

    def __init__(self, max_bytes: int, max_items: int | None = None, sizeof: Callable[[Any], int] = approx_nbytes):
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self._sizeof = sizeof
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keys(self) -> Iterable[Hashable]:
        return list(self._items)

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = self._sizeof(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return  # larger than the whole budget: do not cache, do not evict everything else
            self._items[key] = (value, size)
            self._bytes += size
            while self._items and (
                self._bytes > self.max_bytes or (self.max_items is not None and len(self._items) > self.max_items)
            ):
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self.stats.evictions += 1

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Return the cached value, computing and storing it on a miss."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
