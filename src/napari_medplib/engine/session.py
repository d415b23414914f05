"""`Session`: one resident MedPLIB model, its caches, and ``ask`` / ``ask_stream`` / ``segment``.

Contract (the napari widget, the CLI and scripts rely on it; see also DESIGN.md "Interfaces")::

    session = Session.load(source=None, device="auto", dtype=None, on_progress=None)
    reply = session.ask(image, question, regions=(), *, max_new_tokens=256, temperature=0.0, top_p=1.0,
                        contrast_limits=None, rgb=None, mask_mode="corrected", on_text=None,
                        on_progress=None, cancel=None)
    stream = session.ask_stream(image, question, regions, **same_kwargs); for piece in stream: ...
    result = session.segment(image, points=None, point_labels=None, box=None, mask=None,
                             multimask=False, contrast_limits=None, rgb=None, window="auto",
                             clip_to_box=True, clicked_pieces=True)
    session.cancel(); session.clear_cache(); session.close()

What is cached (keyed by the content hash of the RGB plane the model sees, see ``image.py``):
CLIP features, SAM embeddings (both optionally on disk too), and the LLM's KV cache of the prompt
prefix (system prompt + image) per template, so a new question on the same image runs neither
vision encoder nor the prefix prefill, and a new click runs only SAM's mask decoder.
Every model call holds one re-entrant lock, so a session can be shared between threads.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import LRUCache, content_key
from ..families.registry import family_of
from ..regions import Region
from .disk_cache import DiskEmbeddingCache, Signature
from .errors import SessionClosedError, SessionInputError
from .image import (
    ModelView,
    low_res_to_masks,
    make_view,
    mask_to_low_res,
    region_grid_mask,
    sam_prompt_box,
    sam_prompt_coords,
)
from .loading import (
    Progress,
    dtype_name,
    folder_fingerprint,
    load_model,
    model_fingerprint,
    pick_device,
    pick_dtype,
    resolve_source,
)
from .negatives import exclude_negatives, split_labels
from .prompts import (
    bind_regions,
    check_prompts,
    keep_clicked_pieces,
    keep_inside_box,
    keep_seg_masks_inside_boxes,
    seg_region_prompt,
)
from .reply import AnyEvent, AskStream, CancelledSince, Reply, expert_shares
from .validation import check_contrast_limits, check_image, check_temperature
from .window import (
    WindowedSegmentResult,
    check_window,
    choose_window,
    crop_view,
    mirror_prompts,
    paste_masks,
    shift_prompts,
    unmirror,
)

MASK_MODES = ("corrected", "reference")
#: A click's crop assumes its object is this many times the blob diameter measured under it (1.5 and 2.0
#: gave click Dice 0.660 and 0.653 on the real-image benchmark's tune images).
CLICK_EXTENT_FACTOR = 1.5


class Session:
    """One model on one device, with bounded caches. Build with `Session.load` or `Session.from_model`."""

    def __init__(
        self,
        model,
        *,
        name: str = "model",
        fingerprint: str | None = None,
        template: str = "medplib_v1",
        feature_cache_bytes: int = 512 * 2**20,
        prefix_cache_bytes: int = 2 * 2**30,
        prefix_cache_items: int = 4,
        embedding_cache_dir: str | Path | None = None,
        folder: Path | None = None,
    ) -> None:
        from ..model.tokenizer import get_template

        get_template(template)  # fail early on an unknown template name
        self._model = model
        if getattr(model, "region_encoder", None) is not None:
            model.region_encoder.on_empty = "zero"  # reported in Reply.warnings instead
        self.model_name = name
        self.folder = folder
        self.device = str(model.device)
        self.dtype = dtype_name(model.dtype)
        self.template = template
        self.fingerprint = fingerprint or model_fingerprint(model)
        self._lock = threading.RLock()
        self._cancels = 0  # Session.cancel() calls so far (see CancelledSince)
        self._cancels_guard = threading.Lock()
        self._features = LRUCache(feature_cache_bytes)
        self._prefixes = LRUCache(prefix_cache_bytes, max_items=prefix_cache_items)
        # input plane (content + contrast settings) -> ModelView: repeated clicks on the same plane skip
        # the percentile contrast and colour mapping (a hash of the raw data is much cheaper)
        self._views = LRUCache(256 * 2**20, max_items=4)
        self._clip = self._clip_settings()
        self._disk = (
            DiskEmbeddingCache(embedding_cache_dir, Signature(name, self.fingerprint, self.dtype))
            if embedding_cache_dir is not None else None
        )

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        source: str | Path | None = None,
        device: str = "auto",
        dtype: Any = None,
        on_progress: Progress | None = None,
        **options: Any,
    ) -> Session:
        """Load a model: None = the bundled default; a folder (released layout or ours; a Med-MoE or
        Llama3-Med folder gives a text-only `ChatSession` with the same methods); a model name
        in the search paths; or a hub id already in the local Hugging Face cache (never downloads).

        Device "auto" picks CUDA, then Apple MPS, then the CPU; dtype None is bfloat16 on a GPU and
        float32 on the CPU. ``options`` go to the constructor (cache sizes, ``embedding_cache_dir``,
        ``template``). Raises `ModelLoadError` subclasses with one-line messages.
        """
        folder, name = resolve_source(source)
        device = pick_device(device)
        torch_dtype = pick_dtype(device, dtype)
        family = family_of(folder)
        if family.load is not None:  # a text-only family (Med-MoE, Llama3-Med): the same methods, its model
            from .chat_session import ChatSession

            if on_progress:
                on_progress("loading", 0, 1)
            session = ChatSession.load(folder, family, device, torch_dtype, options.get("name", name),
                                       folder_fingerprint(folder))
            if on_progress:
                on_progress("loading", 1, 1)
            return session  # type: ignore[return-value]
        model = load_model(folder, device, torch_dtype, on_progress)
        options.setdefault("name", name)
        return cls(model, fingerprint=folder_fingerprint(folder), folder=folder, **options)

    @classmethod
    def from_model(cls, model, name: str = "in-memory", **options: Any) -> Session:
        """Wrap an already built ``MedPLIBModel`` (tests, training loops, custom loading)."""
        if model.sam is None:
            raise SessionInputError("the model has no SAM-Med2D; build it with a sam= module")
        return cls(model.eval(), name=name, **options)

    @classmethod
    def connect(cls, url: str, token: str | None = None, **options: Any):
        """A `RemoteSession` on a ``medplib serve`` server at ``url``: the same methods and results as a
        local session, the model on the server's device. ``token``: the server's access token (else
        ``$MEDPLIB_SERVER_TOKEN``; ``token_file=`` reads it from a file). ``options``: ``timeout``,
        ``connect_timeout`` (seconds)."""
        from ..serve.client import RemoteSession

        return RemoteSession(url, token=token, **options)

    def _clip_settings(self):
        from ..model.preprocess import ClipSettings, read_clip_settings

        vision = self._model.config.vision_config
        folder = self._model.config.folder
        if folder:
            for candidate in (Path(folder), Path(folder) / self._model.config.mm_vision_tower):
                if (candidate / "preprocessor_config.json").is_file():
                    try:
                        return read_clip_settings(candidate)
                    except ValueError:
                        break
        return ClipSettings(size=int(vision.get("image_size", 336)))

    # ------------------------------------------------------------------------------ state
    @property
    def model(self):
        if self._model is None:
            raise SessionClosedError("this session is closed; load a new one with Session.load()")
        return self._model

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
        """Drop cached image features, SAM embeddings and prefix KV caches (files on disk stay)."""
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
            if model is not None and str(model.device).startswith("cuda"):
                import torch

                del model
                gc.collect()
                torch.cuda.empty_cache()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ features
    def _view(self, image, contrast_limits, rgb) -> ModelView:
        if image is None:
            raise SessionInputError("no image given; pass one 2-D plane as a numpy array")
        array = np.asarray(image)
        check_image(array)
        check_contrast_limits(contrast_limits)
        if array.dtype == object or array.ndim not in (2, 3):
            return make_view(array, contrast_limits, rgb)  # raises the readable error
        limits = None if contrast_limits is None else np.asarray(contrast_limits, dtype=float).tolist()
        key = content_key(array, limits, rgb)
        view = self._views.get(key)
        if view is None:
            view = make_view(array, contrast_limits, rgb)
            self._views.put(key, view)
        return view

    def _clip_features(self, view: ModelView, on_progress: Progress | None):
        """CLIP patch features + projected image tokens for the plane (memory, disk, or computed)."""
        from ..model.medplib import ImageFeatures
        from ..model.preprocess import prepare_clip_image

        key = ("clip", view.key)
        features = self._features.get(key)
        if features is not None:
            return features
        stored = self._disk.read(view.key) if self._disk is not None else None
        clip = None
        if stored is not None and "clip_patch" in stored:
            device = self.model.device
            features = ImageFeatures(stored["clip_patch"].to(device), stored["clip_tokens"].to(device))
        else:
            if on_progress:
                on_progress("embedding image (CLIP)", 0, 1)
            clip = prepare_clip_image(view.rgb, self._clip.size, self._clip.mean, self._clip.std)
            features = self.model.encode_image(clip.pixel_values.to(self.model.device))
            if self._disk is not None:
                self._disk.write(view.key, {"clip_patch": features.patch_features, "clip_tokens": features.image_tokens}, {})
            if on_progress:
                on_progress("embedding image (CLIP)", 1, 1)
        if self.model.counter is not None and features.count_peaks is None:  # the disk cache keeps the tokens only
            if clip is None:
                clip = prepare_clip_image(view.rgb, self._clip.size, self._clip.mean, self._clip.std)
            features.count_peaks = self.model.count_peaks(clip.pixel_values)
        if self.model.regions_read_brightness:  # cheap, so recomputed rather than stored
            from ..model.preprocess import frame_brightness

            if clip is None:  # the features came from the disk cache
                clip = prepare_clip_image(view.rgb, self._clip.size, self._clip.mean, self._clip.std)
            features.brightness = frame_brightness(clip)[None].to(self.model.device)
        self._features.put(key, features)
        return features

    def _sam_embedding(self, view: ModelView, on_progress: Progress | None):
        """(SAM image embeddings (1, 256, 16, 16), resize_hw, pad) for the plane."""
        from ..model.preprocess import centre_pad_offsets, prepare_sam_image, resize_longest_side_hw

        key = ("sam", view.key)
        entry = self._features.get(key)
        if entry is not None:
            return entry
        size = self.model.sam.config.image_size
        stored = self._disk.read(view.key) if self._disk is not None else None
        if stored is not None and "sam" in stored:
            resize_hw = resize_longest_side_hw(view.rgb.shape[0], view.rgb.shape[1], size)
            entry = (stored["sam"].to(self.model.device), resize_hw, centre_pad_offsets(resize_hw, size))
        else:
            if on_progress:
                on_progress("embedding image (SAM)", 0, 1)
            sam_input = prepare_sam_image(view.rgb, size)
            embeddings = self.model.sam.encode_image(sam_input.pixel_values)
            entry = (embeddings, sam_input.resize_hw, sam_input.pad)
            if self._disk is not None:
                self._disk.write(view.key, {"sam": embeddings}, {})
            if on_progress:
                on_progress("embedding image (SAM)", 1, 1)
        self._features.put(key, entry)
        return entry

    def embed(self, image, contrast_limits=None, rgb=None, on_progress: Progress | None = None) -> str:
        """Compute (or load) both embeddings of a plane ahead of time; returns its content key."""
        import torch

        with self._lock, torch.inference_mode():
            view = self._view(image, contrast_limits, rgb)
            self._clip_features(view, on_progress)
            self._sam_embedding(view, on_progress)
            return view.key

    def _prefix(self, view: ModelView, template: str, ids: list[int], features):
        """The KV cache of the prompt up to ``<im_end>`` on this image (cached per image + template)."""
        end = self.model.tokenizer.token_to_id("<im_end>")
        if end not in ids:
            return None, 0.0
        prefix_ids = ids[: ids.index(end) + 1]
        key = (view.key, template, tuple(prefix_ids))
        prefix = self._prefixes.get(key)
        if prefix is not None:
            return prefix, 0.0
        import torch

        start = time.perf_counter()
        prefix = self.model.prefill(torch.tensor(prefix_ids), image_features=features)
        self._prefixes.put(key, prefix)
        return prefix, time.perf_counter() - start

    # ------------------------------------------------------------------------------ regions
    def _regions(self, regions, image_hw: tuple[int, int]) -> list[Region]:
        return bind_regions(regions, image_hw)

    def _reads_region_pixels(self) -> bool:
        """Whether the model reads a region's pixels (``region_geometry``) rather than the reference's cells."""
        encoder = getattr(self.model, "region_encoder", None)
        return encoder is not None and encoder.reads_pixels

    def _regions_as_read(self, regions: list[Region], view: ModelView, on_progress: Progress | None) -> list[Region]:
        """The regions as the model reads them: a positive point becomes SAM's mask of the clicked object on
        models with ``point_region_mask = "object"`` (the square where SAM finds nothing); else unchanged."""
        clicked = [i for i, r in enumerate(regions) if r.kind == "point" and r.positive]
        if not clicked or not self.model.point_regions_are_objects:
            return regions
        import torch

        embeddings, resize_hw, pad = self._sam_embedding(view, on_progress)
        coords = sam_prompt_coords(np.concatenate([regions[i].coords for i in clicked]), view, resize_hw, pad)
        low_res = self.model.point_object_logits(embeddings, torch.from_numpy(coords))
        out = list(regions)
        masks = low_res_to_masks(low_res, view, resize_hw, pad, threshold=self.model.POINT_OBJECT_THRESHOLD)
        for i, mask in zip(clicked, masks, strict=True):
            if mask.any():
                point = regions[i]
                out[i] = Region.mask(mask, label=point.label, source=point.source, index=point.index,
                                     image_shape=view.image_hw)
        return out

    def _box_objects(self, regions: list[Region], view: ModelView, on_progress: Progress | None) -> list[Region | None]:
        """Per region, the object it stands for when that is not the region itself: SAM's mask of the object
        in each box (kept inside the box), on models whose region tokens read it (region geometry version
        3); None for every other region and where SAM finds nothing."""
        out: list[Region | None] = [None] * len(regions)
        boxed = [i for i, r in enumerate(regions) if r.kind == "box"]
        if not boxed or not self.model.regions_read_brightness or self.model.sam is None:
            return out
        import torch

        embeddings, resize_hw, pad = self._sam_embedding(view, on_progress)
        boxes = [seg_region_prompt(regions[i]).box for i in boxed]  # (y0, x0, y1, x1), corners ordered
        xyxy = np.concatenate([sam_prompt_box(box, view, resize_hw, pad) for box in boxes])
        low_res = self.model.box_object_logits(embeddings, torch.from_numpy(xyxy).float())
        masks = low_res_to_masks(low_res, view, resize_hw, pad, threshold=self.model.POINT_OBJECT_THRESHOLD)
        for i, box, mask in zip(boxed, boxes, masks, strict=True):
            mask = keep_inside_box(mask, box)
            if mask.any():
                out[i] = Region.mask(mask, image_shape=view.image_hw)
        return out

    def _object_masks(self, objects: list[Region | None], view: ModelView):
        """(R, 336, 336) uint8 masks of `_box_objects` on the CLIP frame (zeros: the region itself), or None
        when no region has an object of its own."""
        if not any(o is not None for o in objects):
            return None
        import torch

        from ..model.preprocess import region_mask_to_grid

        vision = self.model.config.vision_config
        size, patch = int(vision["image_size"]), int(vision["patch_size"])
        empty = np.zeros((size, size), np.uint8)
        return torch.from_numpy(np.stack([
            empty if o is None else region_mask_to_grid(region_grid_mask(o, view), size, patch).mask_336 for o in objects
        ]))

    def _region_masks(self, regions: list[Region], view: ModelView):
        """(R, 336, 336) uint8 region masks on the CLIP frame and the indices the model cannot see: no cell of
        the reference's 24x24 grid, or no pixel where the model reads pixels (``region_geometry``)."""
        import torch

        from ..model.preprocess import region_mask_to_grid

        vision = self.model.config.vision_config
        size, patch = int(vision["image_size"]), int(vision["patch_size"])
        grids = [region_mask_to_grid(region_grid_mask(r, view), size, patch) for r in regions]
        pixels = self._reads_region_pixels()
        empty = [i for i, g in enumerate(grids) if not (g.mask_336.any() if pixels else g.n_cells)]
        stacked = torch.from_numpy(np.stack([g.mask_336 for g in grids])) if grids else None
        return stacked, empty

    # ------------------------------------------------------------------------------ ask
    def ask(
        self,
        image,
        question: str,
        regions: Sequence[Region] = (),
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        contrast_limits=None,
        rgb: bool | None = None,
        mask_mode: str = "corrected",
        on_text: Callable[[str], None] | None = None,
        on_progress: Progress | None = None,
        cancel: threading.Event | None = None,
        history: Sequence[tuple[str, str]] = (),
        seed: int | None = None,
        template: str | None = None,
        instances: bool = True,
    ) -> Reply:
        """Answer ``question`` about one plane; one mask per ``<SEG>`` in the answer.

        ``question`` may name regions with ``<region>`` (next in order) or ``<regionK>``; regions not
        named are appended at its end. ``on_text(piece)`` gets the streamed text (calling thread);
        ``instances``: split every ``<SEG>`` mask into one label per object (``Reply.instances``, with a
        per-object table in ``Reply.tables``) and, for a how-many question, ground its noun and count
        (``Reply.measured_count``); False gives the model's masks alone (see ``instance_grounding.py``).
        ``cancel`` (an Event) or `cancel()` stops at the next token (``finish_reason == "cancelled"``,
        no masks). ``history``: earlier (question, answer) turns on the same image.
        """
        import torch

        from ..model.generation import GenerationConfig
        from ..model.tokenizer import encode_question, get_template

        session_cancel = self._cancelled_since()  # before waiting for the lock: cancel() reaches queued calls
        if not isinstance(question, str) or not question.strip():
            raise SessionInputError("the question is empty; type a question about the image")
        if mask_mode not in MASK_MODES:
            raise SessionInputError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        template = template or self.template
        eos_token_id = self.model.config.eos_token_id
        try:
            config = GenerationConfig(
                max_new_tokens=int(max_new_tokens), temperature=check_temperature(temperature), top_p=float(top_p),
                stop_strings=get_template(template).stop_strings, eos_token_id=eos_token_id, seed=seed,
            )
        except ValueError as err:
            raise SessionInputError(str(err)) from None
        with self._lock, torch.inference_mode():
            model = self.model
            timings: dict[str, float] = {}
            start = time.perf_counter()
            view = self._view(image, contrast_limits, rgb)
            used = self._regions(regions, view.image_hw)
            try:
                ids, order = encode_question(model.tokenizer, question, len(used), template, history)
            except ValueError as err:
                raise SessionInputError(str(err).splitlines()[0]) from None
            frame_masks, empty = self._region_masks(self._regions_as_read(used, view, on_progress), view)
            object_masks = self._object_masks(self._box_objects(used, view, on_progress), view)
            timings["preprocess"] = time.perf_counter() - start

            mark = time.perf_counter()
            features = self._clip_features(view, on_progress)
            timings["vision"] = time.perf_counter() - mark

            prefix, timings["prefill"] = self._prefix(view, template, ids, features)
            if on_progress:
                on_progress("generating", 0, config.max_new_tokens)
            mark = time.perf_counter()
            region_masks = [frame_masks[order]] if order else None
            region_objects = [object_masks[order]] if order and object_masks is not None else None

            def stop() -> bool:
                return session_cancel.is_set() or (cancel is not None and cancel.is_set())

            result = model.generate(
                torch.tensor(ids), region_masks=region_masks, image_features=features, config=config,
                stream=on_text, should_stop=stop, prefix=prefix, region_objects=region_objects,
            )
            timings["generate"] = time.perf_counter() - mark
            if on_progress:
                on_progress("generating", len(result.all_ids), config.max_new_tokens)
            if result.region_empty is not None:
                empty = sorted(set(empty) | {order[j] for j, e in enumerate(result.region_empty) if e})

            mark = time.perf_counter()
            masks, scores, split = [], [], None
            seg_indices = result.seg_indices(model.tokenizer.seg_token_id)
            if seg_indices and result.finish_reason != "cancelled":
                seg_hidden = model.answer_seg_hidden(result)
                masks, scores = self._ground(seg_hidden, view, mask_mode, on_progress, [used[i] for i in order])
                if instances:
                    masks, split = self._split_instances(seg_hidden, masks, view, image, question, used, mask_mode,
                                                         contrast_limits, rgb, on_progress, timings)
            timings["masks"] = time.perf_counter() - mark
            counted = (self._measured_count(view, image, question, used, template, contrast_limits, rgb, on_progress,
                                            timings) if instances and result.finish_reason != "cancelled" else None)
            timings["total"] = time.perf_counter() - start

            share, share_mean = expert_shares(result.expert_counts)
            warnings = [self._empty_region_warning(i, used[i], view) for i in empty]
            if seg_indices and result.finish_reason == "cancelled":
                warnings.append("the answer was cancelled before its masks were made")
            fields = self._instance_fields(split, counted, image, warnings, result.text)
            counted_text = fields.pop("counted_text", None)
            return Reply(
                text=counted_text or result.text, model_text=result.text if counted_text else None, masks=masks,
                regions=used, question=question, model=self.model_name,
                finish_reason=result.finish_reason, timings=timings, expert_share=share,
                expert_share_mean=share_mean, warnings=warnings, empty_regions=empty, mask_scores=scores,
                token_ids=list(result.ids), image_key=view.key,
                **fields,
            )

    def _empty_region_warning(self, index: int, region: Region, view: ModelView) -> str:
        vision = self.model.config.vision_config
        size = int(vision["image_size"])
        grid = size // int(vision["patch_size"])
        if self._reads_region_pixels():
            where, unit = f"{size}-px frame", f"one of its pixels is about {max(view.frame_hw) / size:.0f} image pixels"
        else:
            where, unit = f"{grid}x{grid} grid", f"one cell is about {max(view.frame_hw) / grid:.0f} image pixels"
        return (
            f"region {index + 1} ({region.describe()}) is too small for the model's {where} "
            f"({unit}); it was given as an empty region - draw it larger"
        )

    def _ground(self, seg_hidden, view: ModelView, mask_mode: str, on_progress: Progress | None,
                regions: Sequence[Region] = ()):
        """Masks of the answer's ``<SEG>`` s; ``regions`` (question order) also prompt SAM when the model
        was trained that way (``config.seg_region_prompts``, our extension)."""
        from ..model.seg_prompts import pair_with_segs

        model = self.model
        embeddings, resize_hw, pad = self._sam_embedding(view, on_progress)
        prompts = model.seg_prompt_embeddings(seg_hidden)  # [N, 256]
        seg_regions = pair_with_segs(prompts.shape[0], [seg_region_prompt(r) for r in regions])
        low_res, iou = model.decode_seg(embeddings, prompts, seg_regions, view.frame_hw, resize_hw, pad)  # [N, 1, 64, 64]
        masks = low_res_to_masks(low_res, view, resize_hw, pad, mask_mode)
        if model.config.seg_region_prompts:  # SAM was given the regions' boxes: keep the masks inside them
            masks = keep_seg_masks_inside_boxes(masks, seg_regions)
        return masks, [float(v) for v in iou.float().flatten().tolist()]

    def _split_instances(self, seg_hidden, masks, view: ModelView, image, question: str, regions: Sequence[Region],
                         mask_mode: str, contrast_limits, rgb, on_progress: Progress | None,
                         timings: dict[str, float]):
        """(masks, `instance_grounding.SplitResult`) of the answer's ``<SEG>`` masks: one label per object;
        large planes are grounded again in tiles at the model's scale (their merged masks replace ``masks``).
        Tiles only without regions (a region's box prompts SAM on the whole plane) and in corrected mode."""
        from .counting import segment_noun
        from .instance_grounding import split_grounding

        mark = time.perf_counter()
        prompts = self.model.seg_prompt_embeddings(seg_hidden)
        split = split_grounding(self, view, image, prompts, masks, noun=segment_noun(question),
                                contrast_limits=contrast_limits, rgb=rgb,
                                tile=not regions and mask_mode == "corrected", on_progress=on_progress)
        timings["instances"] = time.perf_counter() - mark
        return split.masks, split

    def _measured_count(self, view: ModelView, image, question: str, regions: Sequence[Region], template: str,
                        contrast_limits, rgb, on_progress: Progress | None, timings: dict[str, float]):
        """For a how-many question: (noun, instance labels or None, count or None) from grounding the noun with
        the model's grounding question and splitting its mask; None when the question counts nothing.
        With regions, objects whose centroid lies in any of them are counted."""
        import torch

        from ..model.generation import GenerationConfig
        from ..model.tokenizer import encode_question, get_template
        from .counting import grounding_question, how_many_noun
        from .measure import count_instances

        noun = how_many_noun(question)
        if noun is None:
            return None
        mark = time.perf_counter()
        model = self.model
        ids, _ = encode_question(model.tokenizer, grounding_question(noun), 0, template, ())
        features = self._clip_features(view, on_progress)
        prefix, _ = self._prefix(view, template, ids, features)
        config = GenerationConfig(max_new_tokens=16, temperature=0.0, stop_strings=get_template(template).stop_strings,
                                  eos_token_id=model.config.eos_token_id)
        result = model.generate(torch.tensor(ids), image_features=features, config=config, prefix=prefix)
        labels = count = None
        if result.seg_indices(model.tokenizer.seg_token_id):
            seg_hidden = model.answer_seg_hidden(result)[:1]
            masks, _ = self._ground(seg_hidden, view, "corrected", on_progress)
            _, split = self._split_instances(seg_hidden, masks, view, image, grounding_question(noun), (),
                                             "corrected", contrast_limits, rgb, on_progress, {})
            labels = split.labels[0]
            within = None
            if regions:
                within = np.zeros(view.image_hw, bool)
                for region in regions:
                    within |= region.to_mask(view.image_hw)
            count = count_instances(labels, within)
        timings["count"] = time.perf_counter() - mark
        return noun, labels, count

    @staticmethod
    def _instance_fields(split, counted, image, warnings: list[str], text: str) -> dict[str, Any]:
        """The Reply fields of instance splitting and counting (tables measured on the caller's plane); a
        measured count becomes the answer's number (``Reply.text``; the model's words stay in ``model_text``)."""
        from .counting import counted_answer
        from .measure import measure

        fields: dict[str, Any] = {}
        if split is not None:
            plane = np.asarray(image)
            intensity = plane if plane.ndim == 2 or plane.shape[-1] <= 4 else None
            fields["instances"] = [labels.astype(np.int32, copy=False) for labels in split.labels]
            fields["tables"] = [measure(labels, intensity) for labels in split.labels]
        if counted is not None:
            noun, labels, count = counted
            fields.update(count_noun=noun, measured_count=count, count_labels=labels)
            if count is not None:
                fields["counted_text"] = counted_answer(text, noun, count)
            if count is None:
                warnings.append(f"the model grounded no mask for '{noun}', so nothing was counted")
        return fields

    def _clicked_extent(self, plane: ModelView, points: np.ndarray, labels: np.ndarray) -> float | None:
        """Estimated extent (pixels) of the object under the first positive click, for the crop choice.

        Scale-space blob size at the click (``scale.local_object_diameter``) on the grey plane the model
        sees, times ``CLICK_EXTENT_FACTOR``: blob detection measures an object's width, and a crop with
        room for a longer object costs less than one that cuts it. A fine-tuned model knows the extents
        of the objects it was adapted on (``config.object_extent_range``): the estimate is kept inside them.
        """
        from .scale import clamp_extent, gray_plane, local_object_diameter

        positive = np.flatnonzero(labels > 0)
        if positive.size == 0:
            return None
        key = ("gray", plane.key)
        grey = self._features.get(key)
        if grey is None:
            grey = gray_plane(plane.rgb)
            self._features.put(key, grey)
        y, x = (float(v) / plane.factor for v in points[positive[0]])  # a very large plane is seen reduced
        point = (min(max(y, 0), grey.shape[0] - 1), min(max(x, 0), grey.shape[1] - 1))
        diameter = local_object_diameter(grey, point)
        extent = None if diameter is None else CLICK_EXTENT_FACTOR * diameter * plane.factor
        return clamp_extent(extent, self.model.config.object_extent_range)

    def ask_stream(self, image, question: str, regions: Sequence[Region] = (), **kwargs: Any) -> AskStream:
        """Like `ask`, as an iterator of text pieces; ``stream.reply`` holds the Reply afterwards.

        The answer runs in a helper thread; ``on_progress`` is called from there. Input errors are
        raised here, before iteration starts.
        """
        if "on_text" in kwargs:
            raise SessionInputError("ask_stream() yields the text pieces itself; do not pass on_text")
        if not isinstance(question, str) or not question.strip():
            raise SessionInputError("the question is empty; type a question about the image")
        if kwargs.get("mask_mode", "corrected") not in MASK_MODES:
            raise SessionInputError(f"mask_mode must be one of {MASK_MODES}, got {kwargs['mask_mode']!r}")
        self.model  # noqa: B018 - raise SessionClosedError now, not inside the iteration
        user_cancel = kwargs.pop("cancel", None)
        session_cancel = self._cancelled_since()  # a cancel() right after ask_stream() returns counts too

        def run(emit: Callable[[str], None], stream_cancel: threading.Event) -> Reply:
            cancel = AnyEvent(stream_cancel, user_cancel, session_cancel)
            return self.ask(image, question, regions, on_text=emit, cancel=cancel, **kwargs)

        return AskStream(run)

    # ------------------------------------------------------------------------------ segment
    def segment(
        self,
        image,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
        multimask: bool = False,
        contrast_limits=None,
        rgb: bool | None = None,
        *,
        mask_mode: str = "corrected",
        on_progress: Progress | None = None,
        window: str | int | None = "auto",
        clip_to_box: bool = True,
        clicked_pieces: bool = True,
        flips: bool = False,
    ) -> WindowedSegmentResult:
        """Direct SAM-Med2D prompts, no LLM: points (y, x) with labels 1/0, a box (y0, x0, y1, x1)
        inclusive, and/or a bool (H, W) mask prior. ``multimask`` returns SAM's 3 candidates.

        Negative clicks (label 0) only take pixels away: the mask comes from the positive prompts, then
        the object under each negative click inside it is removed and the mask is cut between the clicks
        (``negatives.exclude_negatives``); the decoder itself grows masks onto a clicked neighbour.
        Negative clicks need a positive click, a box or a mask prior beside them.

        ``window``: "auto" segments inside a crop around the prompts sized so the object spans what the
        model's objects spanned in training (a box's own size; a click's object size estimated under it),
        resized to SAM's input; an int asks for that crop side; None uses the whole plane.
        Masks are full-size either way; ``result.window`` is the area used (see ``window.py``).
        ``clip_to_box``: with a box prompt, mask pixels outside the box are dropped (the box says where
        the object is; see ``prompts.keep_inside_box``); False gives SAM's masks as they are.
        ``clicked_pieces``: with positive clicks, only the mask's connected pieces under a positive click
        are kept (see ``prompts.keep_clicked_pieces``); False keeps every piece.
        ``flips``: segment the crop and its three mirror images and keep the pixels at least two of the four
        masks hold (test-time augmentation: smoother, less biased outlines for 4x the SAM work).
        """
        import torch

        if mask_mode not in MASK_MODES:
            raise SessionInputError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        window = check_window(window)
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            plane = self._view(image, contrast_limits, rgb)
            pts, labels, box_arr, prior = check_prompts(points, point_labels, box, mask, plane.image_hw)
            positives, negatives = split_labels(pts, labels)
            if len(negatives):  # negatives never reach the decoder (see negatives.py)
                if not len(positives) and box_arr is None and prior is None:
                    raise SessionInputError(
                        "negative clicks alone mark no object: add a positive click (or a box) on the object"
                    )
                pts = positives if len(positives) else None
                labels = np.ones(len(positives), np.int64) if len(positives) else None
            timings = {"preprocess": time.perf_counter() - start}
            options = {"image": image, "plane": plane, "multimask": multimask, "contrast_limits": contrast_limits,
                       "rgb": rgb, "mask_mode": mask_mode, "on_progress": on_progress, "window": window,
                       "clip_to_box": clip_to_box, "clicked_pieces": clicked_pieces, "flips": flips,
                       "timings": timings}
            masks, scores, key, used = self._segment_checked(pts, labels, box_arr, prior, **options)
            if len(negatives):
                mark = time.perf_counter()
                objects: dict[tuple[float, float], np.ndarray] = {}

                def object_at(point: np.ndarray) -> np.ndarray:
                    """The object a negative click points at, segmented as if it were a positive click."""
                    where = (float(point[0]), float(point[1]))
                    if where not in objects:
                        found, *_ = self._segment_checked(np.asarray([where]), np.ones(1, np.int64), None, None,
                                                          **dict(options, multimask=False, flips=False))
                        objects[where] = found[0]
                    return objects[where]

                masks = [exclude_negatives(m, negatives, positives, box_arr, object_at) for m in masks]
                timings["negatives"] = time.perf_counter() - mark
            best = int(np.argmax(scores))
            from .measure import measure

            table = measure(masks[best].astype(np.int32), np.asarray(image) if np.ndim(image) == 2 else None)
            timings["total"] = time.perf_counter() - start
            return WindowedSegmentResult(masks[best], masks, scores, timings, key, table=table, window=used)

    def _segment_checked(self, pts, labels, box_arr, prior, *, image, plane: ModelView, multimask: bool,
                         contrast_limits, rgb, mask_mode: str, on_progress: Progress | None, window,
                         clip_to_box: bool, clicked_pieces: bool, flips: bool, timings: dict[str, float]):
        """Checked prompts on the whole plane -> (full-size masks, scores, key of the view SAM saw, window)."""
        model = self.model
        extent = None
        if window == "auto" and box_arr is None and prior is None and pts is not None:
            extent = self._clicked_extent(plane, pts, labels)
        area = choose_window(plane.image_hw, model.sam.config.image_size, pts, box_arr, prior, window,
                             object_extent=extent)
        if area is None:
            view = plane
        else:  # the crop keeps the whole plane's contrast; its content key keys the SAM cache
            view = crop_view(plane, image, area, contrast_limits, rgb)
            pts, box_arr, prior = shift_prompts(area, pts, box_arr, prior)
        if flips and view.factor == 1:  # the four mirror images vote; ties count as object
            votes, scores = None, np.zeros(1)
            for flip_y, flip_x in ((False, False), (True, False), (False, True), (True, True)):
                mirrored, m_pts, m_box, m_prior = mirror_prompts(view, pts, box_arr, prior, flip_y, flip_x)
                m_masks, m_scores = self._decode_view(mirrored, m_pts, labels, m_box, m_prior, multimask,
                                                      mask_mode, on_progress, timings)
                m_masks = [unmirror(m, flip_y, flip_x) for m in m_masks]
                votes = [v + m for v, m in zip(votes, m_masks, strict=True)] if votes else [
                    m.astype(np.int8) for m in m_masks]
                scores = scores + np.asarray(m_scores) / 4
            masks, scores = [v >= 2 for v in votes], [float(v) for v in scores]
        else:
            masks, scores = self._decode_view(view, pts, labels, box_arr, prior, multimask, mask_mode, on_progress,
                                              timings)
        mark = time.perf_counter()
        # cut to the box and the clicked pieces in the crop (the prompts are in its pixels), then paste
        if clip_to_box and box_arr is not None:
            masks = [keep_inside_box(m, box_arr) for m in masks]
        if clicked_pieces and pts is not None:
            masks = [keep_clicked_pieces(m, pts, labels) for m in masks]
        if area is not None:
            masks = paste_masks(masks, area, plane.image_hw)
        timings["masks"] = timings.get("masks", 0.0) + time.perf_counter() - mark
        used = area if area is not None else (0, 0, *plane.image_hw)
        return masks, scores, view.key, used

    def _decode_view(self, view: ModelView, pts, labels, box_arr, prior, multimask: bool, mask_mode: str,
                     on_progress: Progress | None, timings: dict[str, float]):
        """SAM's masks (view-size bool arrays) and IoU scores for prompts in the view's pixels."""
        model = self.model
        mark = time.perf_counter()
        embeddings, resize_hw, pad = self._sam_embedding(view, on_progress)
        timings["vision"] = timings.get("vision", 0.0) + time.perf_counter() - mark
        mark = time.perf_counter()
        low_res, iou = model.sam.decode_with_prompts(
            embeddings,
            points=None if pts is None else sam_prompt_coords(pts, view, resize_hw, pad)[None],
            point_labels=None if labels is None else labels[None],
            boxes=None if box_arr is None else sam_prompt_box(box_arr, view, resize_hw, pad),
            mask_inputs=None if prior is None else mask_to_low_res(prior, view, resize_hw, pad),
            multimask_output=bool(multimask),
        )  # (1, K, 64, 64), (1, K)
        masks = low_res_to_masks(low_res[0][:, None], view, resize_hw, pad, mask_mode)
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - mark
        return masks, [float(v) for v in iou[0].float().tolist()]

    # ------------------------------------------------------------------------------ many planes
    def ask_planes(
        self,
        planes,
        question: str,
        regions: Sequence[Region] = (),
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        contrast_limits=None,
        rgb: bool | None = None,
        mask_mode: str = "corrected",
        instances: bool = True,
        on_progress: Progress | None = None,
        cancel: threading.Event | None = None,
        seed: int | None = None,
        template: str | None = None,
        threads: int | None = None,
    ) -> list[Reply]:
        """Answer ``question`` on every plane of a stack; one `Reply` per plane, as `ask` gives it.

        ``planes``: an array (Z, H, W) / (Z, H, W, C) or a list of 2-D planes; ``regions`` apply to every
        plane. Planes run ``batch_size`` at a time through the encoders, the prompt and each decoding
        step (see ``planes.py``): many times faster than calling `ask` per plane, same greedy answers.
        ``contrast_limits=None`` uses one contrast for the whole stack (`stack.stack_contrast_limits`),
        not each plane's own percentiles, which make an empty plane's noise look like objects.
        ``on_progress("grounding planes", done, total)`` runs after each batch; ``cancel`` (an Event) or
        `cancel()` stops at the next batch or decoding step and returns the planes finished before it.
        ``threads``: torch CPU threads while it runs; None is one for small models (`planes.cpu_threads`:
        spinning OpenMP threads make a small model many times slower when other work shares the cores).
        """
        import torch

        from ..model.generation import GenerationConfig
        from ..model.tokenizer import get_template
        from .planes import as_planes, ask_batch, cpu_threads
        from .stack import stack_contrast_limits

        session_cancel = self._cancelled_since()
        if not isinstance(question, str) or not question.strip():
            raise SessionInputError("the question is empty; type a question about the image")
        if mask_mode not in MASK_MODES:
            raise SessionInputError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if int(batch_size) < 1:
            raise SessionInputError(f"batch_size must be at least 1, got {batch_size}")
        stack = as_planes(planes)
        template = template or self.template
        try:
            config = GenerationConfig(
                max_new_tokens=int(max_new_tokens), temperature=check_temperature(temperature), top_p=float(top_p),
                stop_strings=get_template(template).stop_strings, eos_token_id=self.model.config.eos_token_id,
                seed=seed,
            )
        except ValueError as err:
            raise SessionInputError(str(err)) from None
        if contrast_limits is None:
            contrast_limits = stack_contrast_limits(stack, rgb)

        def stop() -> bool:
            return session_cancel.is_set() or (cancel is not None and cancel.is_set())

        replies: list[Reply] = []
        if on_progress:
            on_progress("grounding planes", 0, len(stack))
        for first in range(0, len(stack), int(batch_size)):
            if stop():
                break
            with self._lock, torch.inference_mode(), cpu_threads(self.model, threads):
                done = ask_batch(self, stack[first : first + int(batch_size)], question, regions, config=config,
                                 template=template, contrast_limits=contrast_limits, rgb=rgb, mask_mode=mask_mode,
                                 instances=instances, stop=stop)
            if done is None:
                break
            replies.extend(done)
            if on_progress:
                on_progress("grounding planes", len(replies), len(stack))
        return replies
