"""What each training step sees, fixed by (seed, stage, step) alone, so a resumed run sees the same data.

Synthetic data is an endless stream: step s of stage k reads samples ``k * 10**7 + s * batch + j`` of
the train split, so no sample repeats and nothing has to be stored. A data set folder (e.g. converted
user annotations) is read in a seeded random order, epoch after epoch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .batches import pack_conversations
from .data import Conversation, Sample, load_dataset, synthetic_items
from .recipe import Recipe, StageSpec

STAGE_OFFSET = 10**7
MAX_SKIPS = 50  # samples without a conversation for the stage's tasks, in a row


@dataclass
class Item:
    sample: Sample
    conversations: list[Conversation]  # one packed sequence (llm stages); none for synthetic sam/vision stages


class StageStream:
    """``stream.batch(step)`` -> the step's items; deterministic, random-access."""

    def __init__(self, recipe: Recipe, stage: StageSpec, stage_index: int) -> None:
        self.recipe, self.stage, self.stage_index = recipe, stage, stage_index
        data = recipe.data
        self.dataset = None if data.source == "synthetic" else load_dataset(recipe.resolve(data.source))
        self.options = {"size": (data.size, data.size)}
        if recipe.stage_styles(stage):
            self.options["styles"] = recipe.stage_styles(stage)

    def _sample(self, index: int) -> tuple[Sample, list[Conversation]]:
        data = self.recipe.data
        if self.dataset is None:
            return next(synthetic_items(1, seed=data.seed, split="train",
                                        n_per_task=self.recipe.stage_n_per_task(self.stage),
                                        start=self.stage_index * STAGE_OFFSET + index,
                                        conversations=self.stage.kind == "llm",
                                        kinds=self.stage.kinds or None, **self.options))
        n = len(self.dataset)
        epoch, position = divmod(index, n)
        order = np.random.default_rng([data.seed, self.stage_index, epoch]).permutation(n)
        return self.dataset[int(order[position])]

    def batch(self, step: int) -> list[Item]:
        stage = self.stage
        rng = np.random.default_rng([self.recipe.seed, self.stage_index, step, 99])
        items: list[Item] = []
        index = step * stage.batch_size * 4  # room for skipped samples
        skips = 0
        while len(items) < stage.batch_size:
            sample, convs = self._sample(index)
            index += 1
            if stage.kind in ("vision", "counter"):  # every image teaches the density or counts, an empty one too
                items.append(Item(sample, convs))
                continue
            if stage.kind == "sam":
                if stage.augment == "realistic":
                    from .augment import realistic

                    sample = realistic(sample, np.random.default_rng([self.recipe.seed, self.stage_index, step, index]),
                                       stage.augment_extent or None)
                if sample.labels.max() > 0:
                    items.append(Item(sample, convs))
                    continue
            else:
                if stage.empty_frames and rng.random() < stage.empty_frames:
                    from .augment import empty_frame

                    sample, convs = empty_frame(sample, convs, rng)
                chunks = pack_conversations(convs, stage.tasks, stage.turns or self.recipe.data.turns_per_sequence, rng)
                if chunks:
                    items.append(Item(sample, chunks[int(rng.integers(len(chunks)))]))
                    continue
            skips += 1
            if skips > MAX_SKIPS:
                raise ValueError(f"stage {stage.name!r}: {MAX_SKIPS} samples in a row have nothing for tasks "
                                 f"{stage.tasks}; check the data set and the stage's tasks")
        return items


_worker_stream: StageStream | None = None  # set in each prefetch worker process by `_start_worker`


def _start_worker(stream: StageStream, trainer_pid: int) -> None:
    global _worker_stream
    import torch  # imported anyway (batches); one thread, so workers do not fight the trainer for cores

    torch.set_num_threads(1)
    # Ctrl-C stops the trainer, which then shuts the pool down; a trainer that is killed outright
    # leaves its workers without a parent, and they must not keep making batches for nobody.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(trainer_pid,), daemon=True).start()
    _worker_stream = stream


def _exit_without(trainer_pid: int, every_s: float = 0.5) -> None:
    while os.getppid() == trainer_pid:
        time.sleep(every_s)
    os._exit(0)


def _worker_batch(step: int) -> list[Item]:
    assert _worker_stream is not None, "prefetch worker started without a stream"
    return _worker_stream.batch(step)


class Prefetcher:
    """``stream.batch(step)`` for steps ``start, start + 1, ...`` (up to ``stop``, when given) made ahead
    of time in worker processes.

    Why: synthetic images and their conversations cost as much CPU as a tiny model's training step
    (the ``regions`` stage of ``tiny-cpu``: ~0.3 s of data per ~0.4 s step), so on a CPU the data is
    made while the model trains, and on a GPU the model never waits. Each batch depends only on
    (seed, stage, step), so the batches are the same as without workers, in the same order; a
    resumed run sees the same data. ``workers = 0`` makes them in this process, one step at a time.
    Workers are spawned (not forked: the trainer's process has torch's thread pools running).
    """

    def __init__(self, stream: StageStream, start: int, workers: int = 0, ahead: int | None = None,
                 stop: int | None = None) -> None:
        self.stream, self.next_step, self.stop = stream, start, stop
        self.ahead = max(ahead if ahead is not None else 2 * workers, workers)
        self.pending: deque[Future] = deque()
        self.submitted = start
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(stream, os.getpid()))

    def next(self) -> list[Item]:
        """The next step's batch."""
        step = self.next_step
        self.next_step += 1
        if self.pool is None:
            return self.stream.batch(step)
        end = self.next_step + self.ahead if self.stop is None else min(self.next_step + self.ahead, self.stop)
        while self.submitted < max(end, self.next_step):  # never past `stop`, but always this step
            self.pending.append(self.pool.submit(_worker_batch, self.submitted))
            self.submitted += 1
        return self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def heldout_items(recipe: Recipe, n: int | None = None) -> Iterator[tuple[Sample, list[Conversation]]]:
    """The held-out split named by the recipe (synthetic held-out seeds, or a folder)."""
    data = recipe.data
    n = data.heldout_n if n is None else n
    if data.heldout_source == "synthetic":
        options = {"size": (data.size, data.size)}
        if data.styles:
            options["styles"] = tuple(data.styles)
        yield from synthetic_items(n, seed=data.seed, split="heldout", n_per_task=data.n_per_task, **options)
        return
    dataset = load_dataset(recipe.resolve(data.heldout_source))
    for i in range(min(n, len(dataset))):
        yield dataset[i]
