"""Stacks for `Session.ask_planes`, whatever the family: planes from an array or a list, and the CPU
thread count while they run. Each family answers a batch of planes its own way (MedPLIB in one
encoder and decoder pass per batch: ``families.medplib.planes``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import SessionInputError

#: Models with fewer parameters run on one CPU thread in `cpu_threads` (the bundled model has 2.7 M).
SMALL_MODEL_PARAMETERS = 50_000_000

#: Planes per batch by default: beyond ~8 small planes a CPU batch is no faster per plane, and the
#: cancel and progress callbacks run between batches.
DEFAULT_BATCH = 8


@contextmanager
def cpu_threads(model, threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads when the model is on the CPU; None: one thread
    for small models (`SMALL_MODEL_PARAMETERS`), else unchanged. The previous count is restored.

    Why: a small model's tensors are too small to gain from a second thread (0.124 vs 0.128 s per plane
    on an idle 2-core machine), but torch's OpenMP threads spin-wait for each other, so when other
    processes share the cores every operator waits for a descheduled thread: measured with a 2-core
    machine shared with other work, 0.1-0.4 planes/s with 2 threads against 4.5-5 with one. The count
    is process-wide; the session's lock keeps its own calls from overlapping.
    """
    import torch

    if str(model.device) != "cpu" or (threads is None and sum(p.numel() for p in model.parameters())
                                      >= SMALL_MODEL_PARAMETERS):
        yield
        return
    wanted = 1 if threads is None else int(threads)
    if wanted < 1:
        raise SessionInputError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def as_planes(planes: Any) -> list[np.ndarray]:
    """A sequence of 2-D planes, or an array whose first axis runs over planes -> a list of planes."""
    if planes is None:
        raise SessionInputError("no planes given; pass a stack (Z, H, W) or a list of 2-D planes")
    if isinstance(planes, np.ndarray) or hasattr(planes, "__array__") and not isinstance(planes, (list, tuple)):
        array = np.asarray(planes)
        if array.ndim < 3:
            raise SessionInputError(
                f"expected a stack of planes (Z, H, W) or (Z, H, W, C), got shape {array.shape}; "
                "for one plane use ask()"
            )
        return [array[i] for i in range(array.shape[0])]
    return [np.asarray(p) for p in planes]


def checked_stack(planes: Any, contrast_limits, rgb: bool | None) -> tuple[list[np.ndarray], Any]:
    """The planes of a stack, each checked, and the contrast limits to use: the caller's, else one
    contrast for the whole stack (`stack.stack_contrast_limits`)."""
    from .stack import stack_contrast_limits
    from .validation import check_plane

    stack = as_planes(planes)
    for plane in stack:
        check_plane(plane, contrast_limits)
    return stack, stack_contrast_limits(stack, rgb) if contrast_limits is None else contrast_limits


def in_batches(stack: Sequence[np.ndarray], size: int, run: Callable[[Sequence[np.ndarray]], list | None],
               stop: Callable[[], bool], on_progress=None) -> list:
    """``run(batch)`` on consecutive batches of ``size`` planes until all ran, ``stop()`` is set or ``run``
    returns None (cancelled): the results of the batches finished, in order.
    ``on_progress("grounding planes", done, total)`` runs before the first batch and after each one."""
    done: list = []
    if on_progress:
        on_progress("grounding planes", 0, len(stack))
    for first in range(0, len(stack), size):
        if stop():
            break
        results = run(stack[first : first + size])
        if results is None:
            break
        done.extend(results)
        if on_progress:
            on_progress("grounding planes", len(done), len(stack))
    return done
