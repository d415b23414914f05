"""One consumer for the model: jobs wait in a bounded queue and run one at a time in one thread.

A model on one GPU gains nothing from two requests decoding interleaved (each step is memory-bound),
and a second request would need a second set of activations. So all model work - ask, segment,
embed - goes through `ModelQueue`: the event loop stays free to stream tokens, take uploads and
answer health checks while the single worker thread runs the blocking model call. A job whose
client left before it started is skipped; a running job is stopped through its ``cancel`` event,
which the Session checks at every generated token.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More jobs are waiting than the server allows."""


@dataclass(eq=False)
class Job:
    """One unit of model work; ``run(job)`` is called in the model thread."""

    run: Callable[[Job], Any]
    client: str = ""
    name: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # the client left: skip it if it has not started
    future: asyncio.Future | None = None


@dataclass
class QueueStats:
    served: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0


class ModelQueue:
    """A bounded FIFO of `Job` s and the single task that runs them."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = int(max_queue)
        self._pending: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medplib-model")
        self._task: asyncio.Task | None = None
        self.current: Job | None = None
        self.stats = QueueStats()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="medplib-model-queue")

    async def stop(self) -> None:
        for job in [*self._pending, *([self.current] if self.current else [])]:
            job.cancel.set()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it. Raises `QueueFull`."""
        if len(self._pending) >= self.max_queue:
            raise QueueFull
        job.future = asyncio.get_running_loop().create_future()
        ahead = len(self._pending) + (self.current is not None)
        self._pending.append(job)
        assert self._wake is not None
        self._wake.set()
        return ahead

    def cancel(self, client: str, name: str | None = None) -> int:
        """Set the cancel event of ``client``'s jobs (one named job, or all of them); returns how many."""
        hit = 0
        for job in [*self._pending, *([self.current] if self.current else [])]:
            if job.client == client and (name is None or job.name == name):
                job.cancel.set()
                hit += 1
        self.stats.cancelled += hit
        return hit

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self._pending.popleft()
            assert job.future is not None
            if job.abandoned or job.future.done():
                self.stats.skipped += 1
                if not job.future.done():
                    job.future.cancel()
                continue
            self.current = job
            try:
                result = await loop.run_in_executor(self._executor, job.run, job)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the request that waits for it
                self.stats.failed += 1
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                self.stats.served += 1
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self.current = None
