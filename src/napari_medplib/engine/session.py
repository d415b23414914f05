"""`Session`: one resident model, its caches, its lock and cancel, and the public API.

Contract (the napari widget, the CLI, batch runs, the server and scripts rely on it)::

    session = Session.load(source=None, device="auto", dtype=None, on_progress=None)
    reply = session.ask(image, question, regions=(), *, max_new_tokens=256, temperature=0.0, top_p=1.0,
                        contrast_limits=None, rgb=None, mask_mode="corrected", on_text=None,
                        on_progress=None, cancel=None)
    stream = session.ask_stream(image, question, regions, **same_kwargs); for piece in stream: ...
    replies = session.ask_planes(stack, question, regions, batch_size=8, **same_kwargs)
    result = session.segment(image, points=None, point_labels=None, box=None, mask=None, multimask=False,
                             contrast_limits=None, rgb=None, window="auto", clip_to_box=True, clicked_pieces=True)
    session.embed(image); session.cancel(); session.clear_cache(); session.cache_info(); session.close()

How a model reads an image, regions and a question is its family's business: `Session.load` asks the
registry for the folder's family (`families.registry.family_of`) and drives that family's adapter
(`families.base.ModelFamily`) step by step. The session keeps what every family shares: residency, the
caches (keyed by the content hash of what the model sees, so a new question on the same image runs
neither encoder nor the prefix prefill again), one re-entrant lock around every model call (a session can
be shared between threads), cancel, the input checks, and these methods.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import LRUCache
from ..families.base import AskRequest, Caches, SegmentRequest, Turn
from ..families.registry import DEFAULT, Family, family_of
from ..regions import Region
from .disk_cache import DiskEmbeddingCache, Signature
from .errors import SessionClosedError, SessionInputError
from .loading import Progress, dtype_name
from .prompts import bind_regions
from .reply import AnyEvent, AskStream, CancelledSince, Reply
from .scale import CLICK_EXTENT_FACTOR  # noqa: F401 - fine-tuning reads it from here
from .validation import check_mask_mode, check_plane, check_question, check_temperature
from .window import WindowedSegmentResult, check_window


class Session:
    """One model on one device, with bounded caches. Build with `Session.load` or `Session.from_model`."""

    def __init__(self, model, *, name: str = "model", fingerprint: str | None = None, template: str | None = None,
                 family: Family | None = None, feature_cache_bytes: int = 512 * 2**20,
                 prefix_cache_bytes: int = 2 * 2**30, prefix_cache_items: int = 4,
                 embedding_cache_dir: str | Path | None = None, folder: Path | None = None) -> None:
        self._info = family or DEFAULT
        self._features = LRUCache(feature_cache_bytes)
        self._prefixes = LRUCache(prefix_cache_bytes, max_items=prefix_cache_items)
        # input plane (content + contrast settings) -> the prepared plane: clicks on one plane skip its contrast
        self._views = LRUCache(256 * 2**20, max_items=4)
        caches = Caches(self._features, self._prefixes, self._views)
        self._adapter = self._info.adapter(self._info, model, caches, template)
        self._model = model
        self.capabilities = self._info.capabilities
        self.model_name = name
        self.folder = folder
        self.device = str(model.device)
        self.dtype = dtype_name(model.dtype)
        self.template = self._adapter.template
        self.fingerprint = fingerprint or self._adapter.fingerprint()
        self._lock = threading.RLock()
        self._cancels = 0  # Session.cancel() calls so far (see CancelledSince)
        self._cancels_guard = threading.Lock()
        self._disk = caches.disk = (
            DiskEmbeddingCache(embedding_cache_dir, Signature(name, self.fingerprint, self.dtype))
            if embedding_cache_dir is not None else None
        )

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def load(cls, source: str | Path | None = None, device: str = "auto", dtype: Any = None,
             on_progress: Progress | None = None, llm_weights: str = "full", **options: Any) -> Session:
        """Load a model: None = the bundled default; a folder (MedPLIB's released layout or ours, or a
        Med-MoE or Llama3-Med folder, which answer in text only); a model name in the search paths; or a
        hub id already in the local Hugging Face cache (never downloads). Device "auto" picks CUDA, then
        Apple MPS, then the CPU; dtype None is bfloat16 on a GPU and float32 on the CPU. ``options`` go to
        the constructor (cache sizes, ``embedding_cache_dir``, ``template``). ``llm_weights="int8"``: the
        MedPLIB language model with int8 weights (``loading.load_weights``). Raises `ModelLoadError`
        subclasses with one-line messages."""
        from . import loading

        folder, name = loading.resolve_source(source)
        device = loading.pick_device(device)
        torch_dtype = loading.pick_dtype(device, dtype)
        family = family_of(folder)
        model = loading.load_weights(family, folder, device, torch_dtype, llm_weights, on_progress)
        options.setdefault("name", name)
        fingerprint = loading.folder_fingerprint(folder) + ("" if llm_weights == "full" else f"+{llm_weights}")
        return cls(model, family=family, fingerprint=fingerprint, folder=folder, **options)

    @classmethod
    def from_model(cls, model, name: str = "in-memory", **options: Any) -> Session:
        """Wrap an already built model: a ``MedPLIBModel`` unless ``family=`` names another family (tests,
        training loops, custom loading)."""
        return cls(model, name=name, **options)

    @classmethod
    def connect(cls, url: str, token: str | None = None, **options: Any):
        """A `RemoteSession` on a ``medplib serve`` server at ``url``: the same methods and results as a
        local session, the model on the server's device. ``token``: the server's access token (else
        ``$MEDPLIB_SERVER_TOKEN``; ``token_file=`` reads it from a file). ``options``: ``timeout``,
        ``connect_timeout`` (seconds)."""
        from ..serve.client import RemoteSession

        return RemoteSession(url, token=token, **options)

    # ------------------------------------------------------------------------------ state
    @property
    def model(self):
        if self._model is None:
            raise SessionClosedError("this session is closed; load a new one with Session.load()")
        return self._model

    @property
    def adapter(self):
        """The family adapter that runs the model (`families.base.ModelFamily`)."""
        self.model  # noqa: B018 - raises SessionClosedError
        return self._adapter

    @property
    def family(self) -> Family | None:
        """The model's family when it is not the plugin's own (callers name it and ask ``family.lacks``)."""
        return None if self._info.default else self._info

    @property
    def closed(self) -> bool:
        return self._model is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.device}, {self.dtype}"
        return f"Session({self.model_name!r}, {state})"

    def cancel(self) -> None:
        """Stop the running ``ask`` at its next token, and those already waiting for it (any thread).

        Calls made after ``cancel()`` returns are not affected."""
        with self._cancels_guard:
            self._cancels += 1

    def _cancelled_since(self) -> CancelledSince:
        return CancelledSince(lambda: self._cancels)

    def clear_cache(self) -> None:
        """Drop cached image features, embeddings and prefix KV caches (files on disk stay)."""
        self._features.clear()
        self._prefixes.clear()
        self._views.clear()

    def cache_info(self) -> dict[str, Any]:
        """Entries, bytes and hit/miss counts of the in-memory caches."""
        return {
            name: {"entries": len(c), "bytes": c.nbytes, "hits": c.stats.hits, "misses": c.stats.misses,
                   "evictions": c.stats.evictions}
            for name, c in (("features", self._features), ("prefixes", self._prefixes))
        }

    def close(self) -> None:
        """Free the model and caches; later calls raise `SessionClosedError`."""
        with self._lock:
            model, self._model = self._model, None
            self.clear_cache()
            if model is not None:
                self._adapter.close()
                if str(model.device).startswith("cuda"):
                    import torch

                    del model
                    gc.collect()
                    torch.cuda.empty_cache()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ checks
    def _check_question(self, question: str, regions, mask_mode: str) -> list:
        """The regions as a list, once the question, mask mode and regions are fit for this model."""
        check_question(question, mask_mode)
        listed = [] if regions is None else [regions] if isinstance(regions, Region | np.ndarray) else list(regions)
        if (listed or "<region" in question) and not self.capabilities["regions"]:
            raise SessionInputError(self._info.lacks("regions"))
        return listed

    def _request(self, question: str, template: str | None, **settings: Any) -> AskRequest:
        settings["temperature"] = check_temperature(settings["temperature"])
        try:
            return self.adapter.check_request(AskRequest(question, template or self.template, **settings))
        except SessionInputError:
            raise
        except ValueError as err:
            raise SessionInputError(str(err)) from None

    def _plane(self, image, contrast_limits, rgb):
        """The plane as the adapter prepares it, once it is checked (the caller holds the lock)."""
        check_plane(image, contrast_limits)
        return self.adapter.prepare_image(image, contrast_limits, rgb)

    # ------------------------------------------------------------------------------ answers
    def ask(self, image, question: str, regions: Sequence[Region] = (), *, max_new_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, contrast_limits=None, rgb: bool | None = None,
            mask_mode: str = "corrected", on_text: Callable[[str], None] | None = None,
            on_progress: Progress | None = None, cancel: threading.Event | None = None,
            history: Sequence[tuple[str, str]] = (), seed: int | None = None, template: str | None = None,
            instances: bool = True) -> Reply:
        """Answer ``question`` about one plane; with MedPLIB, one mask per ``<SEG>`` in the answer.

        ``question`` may name regions with ``<region>`` (next in order) or ``<regionK>``; regions not
        named are appended at its end (families that read no regions refuse them, with the reason).
        ``on_text(piece)`` gets the streamed text (calling thread); ``instances``: split every mask into
        one label per object (``Reply.instances``, with a per-object table in ``Reply.tables``) and, for a
        how-many question, ground its noun and count (``Reply.measured_count``); False gives the model's
        masks alone. ``cancel`` (an Event) or `cancel()` stops at the next token (``finish_reason ==
        "cancelled"``, no masks). ``history``: earlier (question, answer) turns on the same image.
        """
        session_cancel = self._cancelled_since()  # before waiting for the lock: cancel() reaches queued calls
        regions = self._check_question(question, regions, mask_mode)
        request = self._request(question, template, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, history=tuple(history), mask_mode=mask_mode,
                                instances=instances, contrast_limits=contrast_limits, rgb=rgb)
        with self._lock, self.adapter.inference():
            return self._answer(image, regions, request, on_text, on_progress, AnyEvent(session_cancel, cancel).is_set)

    def _answer(self, image, regions, request: AskRequest, on_text=None, on_progress=None,
                should_stop: Callable[[], bool] = lambda: False) -> Reply:
        """One plane through the adapter's steps, in order (the caller holds the lock)."""
        adapter, start = self.adapter, time.perf_counter()
        plane = self._plane(image, request.contrast_limits, request.rgb)
        turn = Turn(request, image, plane, bind_regions(regions, plane.image_hw), on_text, on_progress, should_stop)
        turn.prompt = adapter.build_prompt(turn)
        turn.regions_read = adapter.encode_regions(turn)
        turn.timings["preprocess"] = time.perf_counter() - start
        answer = turn.answer = adapter.generate(turn)
        fields = dict(text=answer.text, finish_reason=answer.finish_reason, token_ids=answer.token_ids,
                      expert_share=answer.expert_share, expert_share_mean=answer.expert_share_mean, image_key=plane.key)
        fields.update(adapter.decode_masks(turn))
        turn.timings["total"] = time.perf_counter() - start
        return Reply(question=request.question, regions=turn.regions, model=self.model_name, timings=turn.timings,
                     **fields)

    def ask_stream(self, image, question: str, regions: Sequence[Region] = (), **kwargs: Any) -> AskStream:
        """Like `ask`, as an iterator of text pieces; ``stream.reply`` holds the Reply afterwards.

        The answer runs in a helper thread; ``on_progress`` is called from there. Input errors are
        raised here, before iteration starts.
        """
        if "on_text" in kwargs:
            raise SessionInputError("ask_stream() yields the text pieces itself; do not pass on_text")
        regions = self._check_question(question, regions, kwargs.get("mask_mode", "corrected"))
        self.model  # noqa: B018 - raise SessionClosedError now, not inside the iteration
        user_cancel = kwargs.pop("cancel", None)
        session_cancel = self._cancelled_since()  # a cancel() right after ask_stream() returns counts too

        def run(emit: Callable[[str], None], stream_cancel: threading.Event) -> Reply:
            cancel = AnyEvent(stream_cancel, user_cancel, session_cancel)
            return self.ask(image, question, regions, on_text=emit, cancel=cancel, **kwargs)

        return AskStream(run)

    def ask_planes(self, planes, question: str, regions: Sequence[Region] = (), *, batch_size: int = 8,
                   max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, contrast_limits=None,
                   rgb: bool | None = None, mask_mode: str = "corrected", instances: bool = True,
                   on_progress: Progress | None = None, cancel: threading.Event | None = None,
                   seed: int | None = None, template: str | None = None, threads: int | None = None) -> list[Reply]:
        """Answer ``question`` on every plane of a stack; one `Reply` per plane, as `ask` gives it.

        ``planes``: an array (Z, H, W) / (Z, H, W, C) or a list of 2-D planes; ``regions`` apply to every
        plane. MedPLIB runs ``batch_size`` planes at a time through the encoders, the prompt and each
        decoding step (``families.medplib.planes``: many times faster than `ask` per plane, same greedy
        answers). ``contrast_limits=None`` uses one contrast for the whole stack, not each plane's own
        percentiles, which make an empty plane's noise look like objects.
        ``on_progress("grounding planes", done, total)`` runs after each batch; ``cancel`` (an Event) or
        `cancel()` stops at the next batch or decoding step and returns the planes finished before it.
        ``threads``: torch CPU threads while it runs; None is one for small models (`planes.cpu_threads`:
        spinning OpenMP threads make a small model many times slower when other work shares the cores).
        """
        from .planes import checked_stack, cpu_threads, in_batches

        session_cancel = self._cancelled_since()
        regions = self._check_question(question, regions, mask_mode)
        if int(batch_size) < 1:
            raise SessionInputError(f"batch_size must be at least 1, got {batch_size}")
        stack, contrast_limits = checked_stack(planes, contrast_limits, rgb)
        request = self._request(question, template, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, mask_mode=mask_mode, instances=instances,
                                contrast_limits=contrast_limits, rgb=rgb)
        stop = AnyEvent(session_cancel, cancel).is_set

        def run(batch: Sequence[np.ndarray]) -> list[Reply] | None:  # None: cancelled
            with self._lock, self.adapter.inference(), cpu_threads(self.model, threads):
                if not self.adapter.batches_planes:  # one plane at a time, through ask's steps
                    reply = self._answer(batch[0], regions, request, should_stop=stop)
                    return None if reply.finish_reason == "cancelled" else [reply]
                done = self.adapter.ask_batch(batch, regions, request, stop)
            return None if done is None else [Reply(question=question, model=self.model_name, **f) for f in done]

        return in_batches(stack, int(batch_size) if self.adapter.batches_planes else 1, run, stop, on_progress)

    # ------------------------------------------------------------------------------ masks
    def segment(self, image, points: Sequence[Sequence[float]] | None = None,
                point_labels: Sequence[int] | None = None, box: Sequence[float] | None = None,
                mask: np.ndarray | None = None, multimask: bool = False, contrast_limits=None,
                rgb: bool | None = None, *, mask_mode: str = "corrected", on_progress: Progress | None = None,
                window: str | int | None = "auto", clip_to_box: bool = True, clicked_pieces: bool = True,
                flips: bool = False) -> WindowedSegmentResult:
        """Direct prompts, no language model: points (y, x) with labels 1/0 (negative clicks only take pixels
        away), a box (y0, x0, y1, x1) inclusive, and/or a bool (H, W) mask prior; ``multimask`` returns 3
        candidates. Families without masks refuse, with the reason. ``window`` ("auto": a crop at the
        model's object scale; an int: that crop side; None: the whole plane), ``clip_to_box``,
        ``clicked_pieces`` and ``flips`` are explained in ``families.medplib.segment``; masks are full-size,
        ``result.window`` is the area used.
        """
        if not self.capabilities["masks"]:
            raise SessionInputError(self._info.lacks("masks"))
        check_mask_mode(mask_mode)
        request = SegmentRequest(image, points, point_labels, box, mask, multimask, contrast_limits, rgb, mask_mode,
                                 on_progress, check_window(window), clip_to_box, clicked_pieces, flips)
        with self._lock, self.adapter.inference():
            check_plane(image, contrast_limits)
            return self.adapter.segment(request)

    def embed(self, image, contrast_limits=None, rgb=None, on_progress: Progress | None = None) -> str:
        """Compute (or load) the plane's embeddings ahead of time; returns its content key."""
        with self._lock, self.adapter.inference():
            plane = self._plane(image, contrast_limits, rgb)
            self.adapter.embed(plane, on_progress)
            return plane.key
