"""Everything slow runs here, in napari thread workers; the Qt thread only applies the results.

Each job is a plain function or generator (testable without Qt) wrapped by `start` in a napari
``create_worker`` with a progress bar in napari's activity dock. Errors never reach the user as a
traceback: `describe_error` turns them into one line with the fix and `report_error` shows it as a
napari notification.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layers import ImagePlane
from .output import MaskPixels, mask_pixels
from .sessions import lock_for, remember, shared


# ---- jobs (run in the worker thread) -------------------------------------------------------------
def load_job(
    source: str | None, device: str, factory: Callable[..., Any] | None = None, *, llm_weights: str = "full"
) -> Generator[str, None, Any]:
    """Load a `Session` (the bundled model for ``source=None``; a remote one for a server URL), or
    reuse the one already loaded for (source, device, LLM weights) by another widget. Yields progress
    lines ("loading weights 3/7"). ``llm_weights="int8"`` quantises a MedPLIB language model as it loads
    (a server chose its own weights)."""
    yield "loading…"
    if factory is not None:
        return factory(source, device=device)
    from .settings import is_server_url, load_server_token, session_key

    key = session_key(source, device, "full" if is_server_url(source) else llm_weights)
    loaded = shared(key)
    if loaded is not None:
        return loaded
    from ..engine import Session

    if is_server_url(source):  # the model runs on a `medplib serve` server
        yield f"connecting to {source}…"
        session = Session.connect(source, token=load_server_token())
        remember(key, session)
        return session

    def load(on_progress: Callable[[str, int, int], None]) -> Any:
        extra = {} if llm_weights == "full" else {"llm_weights": llm_weights}
        return Session.load(source, device=device, on_progress=on_progress, **extra)

    session = yield from _with_progress(load)
    remember(key, session)
    return session


def _with_progress(
    func: Callable[[Callable[[str, int, int], None]], Any],
) -> Generator[str, None, Any]:
    """Run ``func(on_progress)`` in a helper thread and yield its progress as lines of text."""
    import queue

    lines: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        lines.put(f"{stage} {done}/{total}" if total else str(stage))

    def run() -> None:
        try:
            box["value"] = func(report)
        except BaseException as exc:  # handed to the worker thread below
            box["error"] = exc
        lines.put(None)

    threading.Thread(target=run, name="medplib-load", daemon=True).start()
    while (line := lines.get()) is not None:
        yield line
    if "error" in box:
        raise box["error"]
    return box["value"]


def _plane_kwargs(plane: ImagePlane) -> dict[str, Any]:
    return {"contrast_limits": plane.contrast_limits, "rgb": plane.rgb}


@dataclass
class Answer:
    """The engine's Reply plus its masks as pixel lists (scanned here, not on the Qt thread);
    ``objects``: the pixels of every object of its ``<SEG>`` s and their tables (None: no objects)."""

    reply: Any
    pixels: list[MaskPixels]
    objects: tuple[list[MaskPixels], list[dict[str, Any]]] | None = None


def _answer(reply: Any, image: Any = None, regions: Sequence[Any] = ()) -> Answer:
    """The reply with its masks and objects scanned; a how-many answer without objects of its own brings the
    objects it counted (`instances_output.counted_objects`), so the count can be checked on the image."""
    from .instances_output import answer_objects, counted_objects

    objects = answer_objects(reply)
    if objects is None:
        objects = counted_objects(reply, image, regions)
    return Answer(reply, [mask_pixels(m) for m in getattr(reply, "masks", None) or []], objects)


def ask_job(
    session: Any,
    plane: ImagePlane,
    question: str,
    regions: Sequence[Any],
    cancel: threading.Event,
    options: dict[str, Any] | None = None,
) -> Generator[str, None, Answer]:
    """Stream the answer to ``question`` piece by piece; return it as an `Answer`."""
    image = plane.read()
    with lock_for(session):
        stream = session.ask_stream(
            image,
            question,
            list(regions),
            cancel=cancel,
            **_plane_kwargs(plane),
            **(options or {}),
        )
        yield from stream
    return _answer(stream.reply, image, regions)


@dataclass
class StackResult:
    """Answers of a whole-stack question: one `Answer` per plane index, in order.

    ``labels`` (planes, H, W) int32: the answers' objects linked across planes (the same id for the same
    object on neighbouring planes, `engine.stack.link_replies`); ``objects`` the same as
    ``[(plane index, [pixels of object 1, object 2, ...]), ...]`` for `output.write_planes`. Both None
    when the planes were not linked.
    """

    axis: int
    planes: list[tuple[tuple[int, ...], Answer]]
    cancelled: bool = False
    labels: np.ndarray | None = None
    objects: list[tuple[tuple[int, ...], list[MaskPixels]]] | None = None


#: Planes per `Session.ask_planes` call in `stack_job`: the progress bar and Stop act between them.
STACK_BATCH = 8


def stack_job(
    session: Any,
    plane: ImagePlane,
    axis: int,
    question: str,
    regions: Sequence[Any],
    cancel: threading.Event,
    options: dict[str, Any] | None = None,
    link: bool = True,
    min_iou: float = 0.2,
) -> Generator[int, None, StackResult]:
    """Ask ``question`` on every plane along spatial ``axis`` (others stay at the current plane).

    Planes go to `Session.ask_planes` in batches (sessions without it are asked plane by plane), all
    with one contrast: the layer's limits, else the stack's (`engine.stack.stack_contrast_limits`), so
    an empty plane is not stretched into texture. With ``link`` the objects of neighbouring planes are
    matched by overlap (``min_iou``) into 3-D objects. Yields the number of planes done (drives the
    progress bar); returns a `StackResult`.
    """
    from ..engine.stack import stack_contrast_limits

    lead = plane.ndim - 2
    if not 0 <= axis < lead:
        raise ValueError(
            f"whole-stack axis must be one of the image's non-displayed axes 0..{lead - 1}, "
            f"got {axis}"
        )
    these = []
    for i in range(plane.spatial_shape[axis]):
        index = list(plane.index)
        index[axis] = i
        these.append(plane.with_index(index))
    kwargs = _plane_kwargs(plane)
    if kwargs["contrast_limits"] is None:
        kwargs["contrast_limits"] = stack_contrast_limits(_LazyPlanes(these), plane.rgb)
    batched = hasattr(session, "ask_planes")
    step = STACK_BATCH if batched else 1
    out = StackResult(axis, [])
    for first in range(0, len(these), step):
        if cancel.is_set():
            out.cancelled = True
            break
        chunk = these[first : first + step]
        images = [this.read() for this in chunk]
        with lock_for(session):
            if batched:
                replies = session.ask_planes(images, question, list(regions), cancel=cancel,
                                             batch_size=step, **kwargs, **(options or {}))
            else:
                replies = [session.ask(images[0], question, list(regions), cancel=cancel, **kwargs,
                                       **(options or {}))]
        out.planes.extend((this.index, _answer(reply)) for this, reply in zip(chunk, replies))
        if len(replies) < len(chunk) or any(
            getattr(r, "finish_reason", "") == "cancelled" for r in replies
        ):
            out.cancelled = True
            break
        yield len(out.planes)
    if link and out.planes:
        from ..engine.stack import link_replies

        out.labels = link_replies([answer.reply for _, answer in out.planes], min_iou,
                                  shape=plane.plane_shape)
        n = int(out.labels.max(initial=0))
        out.objects = [(index, object_pixels(labels, n)) for (index, _), labels in
                       zip(out.planes, out.labels, strict=True)]
    return out


class _LazyPlanes:
    """The planes of a stack as a sequence read on indexing (the contrast samples only some)."""

    def __init__(self, planes: Sequence[ImagePlane]) -> None:
        self._planes = planes

    def __len__(self) -> int:
        return len(self._planes)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return [p.read() for p in self._planes[key]]
        return self._planes[key].read()


def object_pixels(labels: np.ndarray, n: int) -> list[MaskPixels]:
    """Labels (H, W) -> pixels of objects 1..n on this plane (empty where an object is absent), so that
    the k-th entry of every plane is the same 3-D object for `output.write_planes`."""
    shape = (int(labels.shape[0]), int(labels.shape[1]))
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols]
    order = np.argsort(values, kind="stable")
    rows, cols, values = rows[order], cols[order], values[order]
    bounds = np.searchsorted(values, np.arange(1, n + 2))
    return [MaskPixels(shape, rows[bounds[k] : bounds[k + 1]], cols[bounds[k] : bounds[k + 1]])
            for k in range(n)]


def segment_job(session: Any, plane: ImagePlane, prompts: dict[str, Any], clip_to_box: bool = True,
                clicked_pieces: bool = True) -> Any:
    """Direct prompt -> mask with `Session.segment` (no LLM); ``clip_to_box`` keeps a box's mask inside it,
    ``clicked_pieces`` keeps only the pieces under a positive click."""
    image = plane.read()
    with lock_for(session):
        return session.segment(image, **prompts, **_plane_kwargs(plane), clip_to_box=clip_to_box,
                               clicked_pieces=clicked_pieces)


# ---- prompts for direct segmentation -------------------------------------------------------------
#: A positive click this many pixels outside a box's edge still counts as inside it (hand placement).
BOX_SLACK = 2.0


@dataclass
class PromptPlan:
    """`Session.segment` keyword sets for the prompts on a plane, and notes for the user.

    ``prompts``: one dict per object to segment. ``notes``: what the user should know (clicks that lie
    outside every box and are segmented as an object of their own). ``negatives_only``: there were
    negative clicks but nothing positive to segment.
    """

    prompts: list[dict[str, Any]]
    notes: list[str]
    negatives_only: bool = False


def _inside(point: Any, box: tuple[float, float, float, float], slack: float = BOX_SLACK) -> bool:
    y, x = (float(v) for v in point.coords[0])
    y0, x0, y1, x1 = box
    return y0 - slack <= y <= y1 + slack and x0 - slack <= x <= x1 + slack


def plan_prompts(regions: Sequence[Any]) -> PromptPlan:
    """Regions -> one `Session.segment` prompt per object; prompts combine only where they overlap.

    * Every box / polygon / mask is one object; polygons and masks give their bounding box plus the
      shape itself as a mask prior.
    * A positive click inside a box (within `BOX_SLACK` pixels) refines that box's object (the
      smallest box that holds it). The positive clicks outside every box make one more object
      together, and a note says so: a click is never combined with a box elsewhere (an old box left
      ticked in another layer, say).
    * Negative clicks go with every object: the engine only ever removes pixels with them, and one
      away from an object changes nothing.
    """
    points = [r for r in regions if r.kind == "point"]
    positives = [r for r in points if r.positive]
    negatives = [r for r in points if not r.positive]
    shaped = [(r, r.bbox) for r in regions if r.kind != "point"]
    shaped = [(r, tuple(float(v) for v in box)) for r, box in shaped if box is not None]

    def area(box: tuple[float, ...]) -> float:
        return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)

    owner: dict[int, int] = {}  # positive click -> the smallest box holding it
    for i, point in enumerate(positives):
        holding = [k for k, (_, box) in enumerate(shaped) if _inside(point, box)]
        if holding:
            owner[i] = min(holding, key=lambda k: area(shaped[k][1]))

    def clicks(chosen: list[Any]) -> dict[str, Any]:
        chosen = chosen + negatives
        if not chosen:
            return {}
        return {
            "points": [tuple(float(v) for v in r.coords[0]) for r in chosen],
            "point_labels": [int(r.positive) for r in chosen],
        }

    prompts: list[dict[str, Any]] = []
    for k, (region, box) in enumerate(shaped):
        mine = [p for i, p in enumerate(positives) if owner.get(i) == k]
        prompt = dict(clicks(mine), box=box)
        if region.kind in ("polygon", "mask"):
            prompt["mask"] = region.to_mask()
        prompts.append(prompt)
    loose = [p for i, p in enumerate(positives) if i not in owner]
    notes: list[str] = []
    if loose:
        prompts.append(clicks(loose))
        if shaped:
            where = ", ".join(p.describe() for p in loose[:3]) + (" ..." if len(loose) > 3 else "")
            boxes = ", ".join(sorted({r.describe() for r, _ in shaped[:3]}))
            notes.append(
                f"{where} lie{'s' if len(loose) == 1 else ''} outside every box ({boxes}), so "
                f"{'it is' if len(loose) == 1 else 'they are'} segmented as a separate object; untick a "
                "layer under Regions to leave its prompts out"
            )
    return PromptPlan(prompts, notes, negatives_only=bool(negatives) and not prompts)


def segment_prompts(regions: Sequence[Any]) -> list[dict[str, Any]]:
    """The `Session.segment` keyword sets of `plan_prompts` (without its notes)."""
    return plan_prompts(regions).prompts


# ---- errors --------------------------------------------------------------------------------------
def describe_error(exc: BaseException) -> str:
    """One line for a notification: the engine's own message for input errors, else a hint."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "MedPLIB ran out of memory: pick device 'cpu' or a smaller model in Model settings, "
            "or ask about a smaller image"
        )
    if any(k.__name__ == "ModelLoadError" for k in type(exc).__mro__):
        return (
            f"MedPLIB: {text}. In the widget: open 'Model settings', choose 'Model folder…' "
            "and pick the folder, then ask again"
        )
    if isinstance(exc, (ValueError, FileNotFoundError, KeyError)):
        return f"MedPLIB: {text}"
    if isinstance(exc, ImportError):
        return (
            f"MedPLIB cannot import {getattr(exc, 'name', None) or text}; reinstall napari-medplib"
        )
    return f"MedPLIB failed ({type(exc).__name__}: {text}); see the log for details"


def report_error(exc: BaseException) -> None:
    """Show ``exc`` as a napari error notification (never a traceback dialog)."""
    from napari.utils.notifications import show_error

    show_error(describe_error(exc))


def report_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def report_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


# ---- napari workers ------------------------------------------------------------------------------
class JobError(Exception):
    """Carries a RuntimeError out of a worker: superqt drops RuntimeErrors as 'aborted thread'
    without emitting ``errored`` or ``finished``, and torch reports most failures as one."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with RuntimeErrors wrapped in `JobError` (generators stay generators)."""
    if inspect.isgeneratorfunction(func):

        def gen(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from func(*args, **kwargs))
            except RuntimeError as exc:
                raise JobError(exc) from exc

        return gen

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:
            raise JobError(exc) from exc

    return call


def _unwrap(handler: Callable[[BaseException], None]) -> Callable[[BaseException], None]:
    return lambda exc: handler(exc.original if isinstance(exc, JobError) else exc)


def start(
    func: Callable[..., Any],
    *args: Any,
    desc: str,
    total: int = 0,
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``func(*args, **kwargs)`` in a napari thread worker with an activity-dock progress bar.

    Errors go to ``on_error`` (default: `report_error`), never to napari's traceback handler.
    """
    from napari.qt.threading import create_worker

    progress: dict[str, Any] = {"desc": desc}
    if total:
        progress["total"] = int(total)
    worker = create_worker(
        _guarded(func),
        *args,
        _progress=progress if inspect.isgeneratorfunction(func) else False,
        _ignore_errors=True,
        _start_thread=False,
        **kwargs,
    )
    if on_yield is not None and hasattr(worker, "yielded"):
        worker.yielded.connect(on_yield)
    if on_return is not None:
        worker.returned.connect(on_return)
    worker.errored.connect(_unwrap(on_error or report_error))
    if on_finish is not None:
        worker.finished.connect(on_finish)
    worker.start()
    return worker


def mask_summary(masks: Sequence[np.ndarray]) -> str:
    """'2 masks (1,204 and 88 px)' for the transcript."""
    areas = [int(np.count_nonzero(m)) for m in masks]
    if not areas:
        return "no mask"
    return (
        f"{len(areas)} mask{'s' if len(areas) > 1 else ''} ("
        + " and ".join(f"{a:,} px" for a in areas)
        + ")"
    )
