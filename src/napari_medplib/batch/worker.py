"""The Dask side of a batch run: a worker plugin that keeps one loaded model per worker, and the task.

Imported only on Dask workers and by the driver when it starts a cluster (it imports distributed).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker

from .inputs import Item
from .options import BatchOptions, ItemError
from .task import load_session, run_item

PLUGIN_NAME = "napari-medplib-session"


class SessionPlugin(WorkerPlugin):
    """One `Session` per worker, loaded on the worker's first item and kept for the rest.

    Loading lazily keeps a worker's start (and a replacement worker's, after one dies) fast, and a
    model that fails to load fails its item with the reason instead of the worker's start.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, model: str | None, device: str, dtype: str | None, threads: int,
                 llm_weights: str = "full") -> None:
        self.model, self.device, self.dtype, self.threads = model, device, dtype, threads
        self.llm_weights = llm_weights
        self._session: Any = None
        self._lock: threading.Lock | None = None  # made on the worker (locks do not travel)
        self._worker_name: Any = None

    def setup(self, worker: Any) -> None:
        self._worker_name = worker.name
        self._lock = threading.Lock()
        relax_malloc_trim()

    def teardown(self, worker: Any) -> None:
        if self._session is not None:
            self._session.close()

    def session(self) -> Any:
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            if self._session is None:
                device = worker_device(self.device, self._worker_name)
                self._session = load_session(self.model, device, self.dtype, self.threads, self.llm_weights)
            return self._session


#: glibc mallopt parameters (malloc.h) and the values a model worker wants.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_BYTES, _MMAP_BYTES = 256 * 2**20, 32 * 2**20


def relax_malloc_trim() -> bool:
    """Undo the nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` for this worker (Linux/glibc only).

    Dask's nanny starts workers with that variable so that freed memory goes back to the system
    quickly. It also fixes glibc's mmap threshold, so every large tensor is mapped and unmapped
    afresh: a model's inference ran 1.5x slower per image in such workers (docs/batch.md). Higher
    thresholds, set here, restore the plain process's speed; memory still returns to the system above
    them.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    except (OSError, AttributeError):  # another C library: leave it as it is
        return False


def worker_device(device: str, worker_name: Any) -> str:
    """One GPU per worker on a multi-GPU machine: worker k takes cuda:(k mod #GPUs)."""
    if device not in ("auto", "cuda") or not isinstance(worker_name, int):
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{worker_name % count}" if count > 1 else device


def dask_task(item: Item, options: BatchOptions, out: str) -> dict[str, Any]:
    """What a worker runs: the item with the worker's session; input problems become failed records."""
    plugin = get_worker().plugins[PLUGIN_NAME]
    try:
        return run_item(item, options, plugin.session(), Path(out))
    except ItemError as exc:
        return {"key": item.key, "status": "failed", "error": str(exc)}
