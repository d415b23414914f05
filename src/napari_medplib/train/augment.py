"""Augmentation towards real microscopy, for SAM stages: objects at the scale the engine shows them.

Synthetic images draw objects at one size per style; real objects span 5 to 300 pixels, and the
engine (``engine/window.py``) crops around a prompt so that its object spans a set part of SAM's
256-px input (``scale.PROMPT_OBJECT_EXTENT``). ``realistic`` makes a training sample the same
way: it rescales the synthetic image (objects 0.35x to 3x their drawn size, so upsampled blur and
downsampled aliasing are both seen), then cuts the crop the engine would cut around one of its objects
(with the target extent jittered), and changes what real images change: polarity (dark objects on
bright ground), uneven illumination with a 20-fold intensity range, gamma, noise, blur, JPEG, and one
or three channels. Instances cut by the crop's edge are dropped (the engine's crops hold the whole
prompt). numpy, scipy, scikit-image and Pillow; deterministic for a given generator.
"""

from __future__ import annotations

import io
import math

import numpy as np
from scipy import ndimage as ndi

from .data import Conversation, Sample

#: Object rescale range (log-uniform) before cropping.
ZOOM = (0.35, 3.0)
#: Spread (log-normal sigma) of the crop's target extent around the engine's.
TARGET_JITTER = 0.3


def _unit(image: np.ndarray) -> np.ndarray:
    """float32 (H, W, C) in 0..1 from the sample's camera values (robust percentiles per image)."""
    array = image.astype(np.float32)
    if array.ndim == 2:
        array = array[..., None]
    lo, hi = np.percentile(array, (0.5, 99.8))
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _photometric(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Polarity, channels, uneven illumination, gamma: what differs between microscopes and stains."""
    h, w, c = x.shape
    if c == 1 and rng.random() < 0.3:
        x = 1.0 - x  # dark objects on a bright ground (transmitted light, EM) and the reverse
    if c == 1 and rng.random() < 0.15:  # one stain shown in colour (a tinted channel, IHC-like)
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        x = 1.0 - (1.0 - x) * tint if rng.random() < 0.5 else x * tint
    elif c == 3 and rng.random() < 0.2:
        x = x.mean(axis=-1, keepdims=True)
    elif c == 2:
        x = np.concatenate([x, np.zeros((h, w, 1), np.float32)], axis=-1)
    if rng.random() < 0.35:  # uneven illumination / staining: up to a 20-fold range over the field
        coarse = rng.standard_normal((4, 4)).astype(np.float32)
        field = ndi.zoom(coarse, (h / 4, w / 4), order=1)[:h, :w]
        field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
        x = x * np.exp(-rng.uniform(0.5, math.log(20.0)) * field)[..., None]
    if rng.random() < 0.5:
        x = np.clip(x, 0, 1) ** rng.uniform(0.6, 1.6)
    return x


def _rescale(rng: np.random.Generator, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.transform import resize

    zoom = math.exp(rng.uniform(math.log(ZOOM[0]), math.log(ZOOM[1])))
    h, w = labels.shape
    out_hw = (max(32, round(h * zoom)), max(32, round(w * zoom)))
    image = resize(x, (*out_hw, x.shape[-1]), order=1, anti_aliasing=zoom < 1, preserve_range=True)
    labels = resize(labels, out_hw, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return image.astype(np.float32), labels


def _object_crop(rng: np.random.Generator, x: np.ndarray, labels: np.ndarray,
                 extent: float) -> tuple[np.ndarray, np.ndarray]:
    """The crop ``Session.segment(box=...)`` would cut around a random object (target ``extent`` jittered)."""
    from ..engine.window import choose_window

    boxes = [s for s in ndi.find_objects(labels) if s is not None]
    if not boxes:
        return x, labels
    rows, cols = boxes[int(rng.integers(len(boxes)))]
    box = np.array([rows.start, cols.start, rows.stop - 1, cols.stop - 1], float)
    target = extent * math.exp(rng.normal(0.0, TARGET_JITTER))
    window = choose_window(labels.shape, 256, None, box, None, "auto", target_extent=target)
    if window is None:
        return x, labels
    y0, x0, y1, x1 = window
    return x[y0:y1, x0:x1], labels[y0:y1, x0:x1]


def _drop_cut(labels: np.ndarray) -> np.ndarray:
    """Instances touching the crop's edge removed (unless that removes all of them)."""
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    kept = np.where(np.isin(labels, edge), 0, labels)
    return kept if kept.max() > 0 else labels


def _degrade(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Blur, noise and JPEG at the crop's resolution; returns uint8."""
    if rng.random() < 0.3:
        x = ndi.gaussian_filter(x, (rng.uniform(0.3, 1.5),) * 2 + (0,))
    if rng.random() < 0.5:
        x = x + rng.uniform(0.0, 0.06) * rng.standard_normal(x.shape).astype(np.float32)
    out = np.clip(np.rint(np.clip(x, 0, 1) * 255.0), 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        from PIL import Image

        buffer = io.BytesIO()
        squeezed = out[..., 0] if out.shape[-1] == 1 else out
        Image.fromarray(squeezed).save(buffer, format="JPEG", quality=int(rng.integers(30, 91)))
        out = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        out = out[..., None] if out.ndim == 2 else out
    return out


def realistic(sample: Sample, rng: np.random.Generator, extent: float | None = None) -> Sample:
    """A new `Sample`: rescaled, cropped so one object spans about ``extent`` of SAM's 256 pixels (default
    ``scale.MODEL_OBJECT_EXTENT``, the synthetic frames' own), and photometrically changed."""
    from ..engine.scale import MODEL_OBJECT_EXTENT

    if extent is not None and not extent > 0:
        raise ValueError(f"extent must be positive (or None for the default), got {extent!r}")
    x = _photometric(rng, _unit(sample.image))
    x, labels = _rescale(rng, x, sample.labels)
    x, labels = _object_crop(rng, x, labels, MODEL_OBJECT_EXTENT if extent is None else float(extent))
    labels = _drop_cut(labels)
    image = _degrade(rng, x)
    image = image[..., 0] if image.shape[-1] == 1 else image
    kept = {int(i): sample.categories[int(i)] for i in np.unique(labels) if i > 0 and int(i) in sample.categories}
    return Sample(np.ascontiguousarray(image), np.ascontiguousarray(labels), kept, sample.style,
                  dict(sample.meta, augmented="realistic"))


def empty_frame(sample: Sample, conversations: list[Conversation],
                rng: np.random.Generator) -> tuple[Sample, list[Conversation]]:
    """The same frame with its objects painted over by the nearest background and that background's grain:
    every grounding conversation without a region keeps its question and answer, with empty target masks;
    the others are dropped (their regions would point at nothing).

    Why: a grounding stage whose every frame holds objects learns to mark something on any frame, so the
    empty planes at the ends of a z-stack came back two-thirds marked. Such frames teach "nothing here".
    """
    labels = np.asarray(sample.labels)
    image = np.asarray(sample.image)
    objects = ndi.binary_dilation(labels > 0, iterations=5)  # blurred rims too
    if objects.all() or not objects.any():
        return sample, conversations
    _, (rows, cols) = ndi.distance_transform_edt(objects, return_indices=True)
    filled = image[rows, cols].astype(np.float32)
    background = image.astype(np.float32)
    smooth = ndi.gaussian_filter(background, (1.5, 1.5) + (0,) * (image.ndim - 2))
    grain = (background - smooth)[~objects]
    filled = ndi.gaussian_filter(filled, (2.0, 2.0) + (0,) * (image.ndim - 2))
    if grain.size:  # background grain resampled pixel by pixel (all channels of a pixel together)
        filled += grain[rng.integers(len(grain), size=filled.shape[:2])]
    info = np.iinfo(image.dtype) if np.issubdtype(image.dtype, np.integer) else None
    if info is not None:
        filled = np.clip(np.rint(filled), info.min, info.max)
    blank = Sample(filled.astype(image.dtype), np.zeros_like(labels), {}, sample.style,
                   dict(sample.meta, augmented="empty"))
    kept = [Conversation(c.question, c.answer, c.task, c.kind, [], [np.zeros_like(m, dtype=bool) for m in c.target_masks],
                         c.canonical, c.choices, dict(c.meta, empty=True))
            for c in conversations if c.task == "grounding" and not c.regions]
    return blank, kept
