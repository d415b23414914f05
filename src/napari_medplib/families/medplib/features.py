"""MedPLIB's image side: the plane as the model sees it, and what its encoders make of it, cached.

The view (``engine.image.ModelView``: contrast, colour, a reduced copy of very large planes) is cached
by the raw plane's content and contrast settings, so repeated clicks on one plane skip the percentile
contrast. CLIP features (plus the counter's peaks and the frame brightness on models that read them),
SAM-Med2D embeddings and the prompt prefix's KV cache are cached by the view's content key, in memory
and, for the two embeddings, optionally on disk (the session's `families.base.Caches`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...cache import content_key
from ...engine.image import ModelView, make_view


def clip_settings(model):
    """The CLIP image processor settings of the model's folder (its own or its tower's), else the defaults."""
    from ...model.preprocess import ClipSettings, read_clip_settings

    vision = model.config.vision_config
    folder = model.config.folder
    if folder:
        for candidate in (Path(folder), Path(folder) / model.config.mm_vision_tower):
            if (candidate / "preprocessor_config.json").is_file():
                try:
                    return read_clip_settings(candidate)
                except ValueError:
                    break
    return ClipSettings(size=int(vision.get("image_size", 336)))


def prepare_image(family, image, contrast_limits, rgb) -> ModelView:
    """The view of a checked plane (cached by content, contrast limits and ``rgb``)."""
    array = np.asarray(image)
    if array.dtype == object or array.ndim not in (2, 3):
        return make_view(array, contrast_limits, rgb)  # raises the readable error
    limits = None if contrast_limits is None else np.asarray(contrast_limits, dtype=float).tolist()
    key = content_key(array, limits, rgb)
    views = family.caches.views
    view = views.get(key)
    if view is None:
        view = make_view(array, contrast_limits, rgb)
        views.put(key, view)
    return view


def clip_features(family, view: ModelView, on_progress=None):
    """CLIP patch features + projected image tokens for the whole plane (memory, disk, or computed)."""
    from ...model.medplib import ImageFeatures
    from ...model.preprocess import prepare_clip_image

    model, caches, settings = family.model, family.caches, family.clip
    key = ("clip", view.key)
    features = caches.features.get(key)
    if features is not None:
        return features
    stored = caches.disk.read(view.key) if caches.disk is not None else None
    clip = None
    if stored is not None and "clip_patch" in stored:
        device = model.device
        features = ImageFeatures(stored["clip_patch"].to(device), stored["clip_tokens"].to(device))
    else:
        if on_progress:
            on_progress("embedding image (CLIP)", 0, 1)
        clip = prepare_clip_image(view.rgb, settings.size, settings.mean, settings.std)
        features = model.encode_image(clip.pixel_values.to(model.device))
        if caches.disk is not None:
            caches.disk.write(view.key, {"clip_patch": features.patch_features, "clip_tokens": features.image_tokens}, {})
        if on_progress:
            on_progress("embedding image (CLIP)", 1, 1)
    if model.counter is not None and features.count_peaks is None:  # the disk cache keeps the tokens only
        if clip is None:
            clip = prepare_clip_image(view.rgb, settings.size, settings.mean, settings.std)
        features.count_peaks = model.count_peaks(clip.pixel_values)
    if model.regions_read_brightness:  # cheap, so recomputed rather than stored
        from ...model.preprocess import frame_brightness

        if clip is None:  # the features came from the disk cache
            clip = prepare_clip_image(view.rgb, settings.size, settings.mean, settings.std)
        features.brightness = frame_brightness(clip)[None].to(model.device)
    caches.features.put(key, features)
    return features


def sam_embedding(family, view: ModelView, on_progress=None):
    """(SAM image embeddings (1, 256, 16, 16), resize_hw, pad) for the plane."""
    from ...model.preprocess import centre_pad_offsets, prepare_sam_image, resize_longest_side_hw

    model, caches = family.model, family.caches
    key = ("sam", view.key)
    entry = caches.features.get(key)
    if entry is not None:
        return entry
    size = model.sam.config.image_size
    stored = caches.disk.read(view.key) if caches.disk is not None else None
    if stored is not None and "sam" in stored:
        resize_hw = resize_longest_side_hw(view.rgb.shape[0], view.rgb.shape[1], size)
        entry = (stored["sam"].to(model.device), resize_hw, centre_pad_offsets(resize_hw, size))
    else:
        if on_progress:
            on_progress("embedding image (SAM)", 0, 1)
        sam_input = prepare_sam_image(view.rgb, size)
        embeddings = model.sam.encode_image(sam_input.pixel_values)
        entry = (embeddings, sam_input.resize_hw, sam_input.pad)
        if caches.disk is not None:
            caches.disk.write(view.key, {"sam": embeddings}, {})
        if on_progress:
            on_progress("embedding image (SAM)", 1, 1)
    caches.features.put(key, entry)
    return entry


def prefix(family, view: ModelView, template: str, ids: list[int], features):
    """The KV cache of the prompt up to ``<im_end>`` on this image (cached per image + template), and the
    seconds its prefill took (0 when cached or when the prompt has no image)."""
    model = family.model
    end = model.tokenizer.token_to_id("<im_end>")
    if end not in ids:
        return None, 0.0
    prefix_ids = ids[: ids.index(end) + 1]
    key = (view.key, template, tuple(prefix_ids))
    found = family.caches.prefixes.get(key)
    if found is not None:
        return found, 0.0
    import torch

    start = time.perf_counter()
    found = model.prefill(torch.tensor(prefix_ids), image_features=features)
    family.caches.prefixes.put(key, found)
    return found, time.perf_counter() - start
