"""Whole-stack grounding helpers: one contrast for the stack, per-plane instances, linking across planes.

The model answers one 2-D plane at a time. A 3-D result needs two things the per-plane answers do not
give by themselves:

* the same contrast on every plane (`stack_contrast_limits`): a plane stretched on its own percentiles
  turns the noise of a plane with no objects into full-range texture, and the model then labels the
  gaps between nuclei there;
* the same label id for the same object on neighbouring planes (`link_planes`): instances are matched
  plane to plane by overlap (IoU, or a small section inside a larger one; Hungarian assignment),
  unmatched ones get new ids.

Napari-free and torch-free: the widget, scripts and tests call these with plain arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..imaging import DEFAULT_PERCENTILES, Limits, describe_plane

#: Planes sampled at most for the stack's percentiles (evenly spaced): limits of a long stack cost
#: no more than those of a few planes.
MAX_CONTRAST_PLANES = 64


def stack_contrast_limits(
    planes: Sequence[np.ndarray],
    rgb: bool | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> Limits | list[Limits] | None:
    """One contrast for every plane of a stack: the percentiles of all planes together (per channel for
    multi-channel data), or None where planes are shown as they are (8-bit grey and RGB data).

    Why: asked plane by plane without limits, each plane is stretched on its own percentiles, so an
    empty plane's noise fills the full range and looks like objects to the model.
    """
    if len(planes) == 0:
        return None
    first = np.asarray(planes[0])
    layout = describe_plane(first, rgb)
    if first.dtype == np.uint8 or first.dtype == bool:
        return None  # 8-bit data passes through unchanged plane by plane (`imaging.to_model_rgb`)
    step = max(1, -(-len(planes) // MAX_CONTRAST_PLANES))
    sample = np.stack([np.asarray(p) for p in planes[::step]])
    if layout.rgb:
        sample = sample[..., :3]
    if layout.rgb or layout.channels == 1:
        return _limits(sample, percentiles)
    return [_limits(sample[..., c], percentiles) for c in range(layout.channels)]


def _limits(values: np.ndarray, percentiles: Sequence[float]) -> Limits:
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values.ravel()
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(finite, percentiles)
    return (float(lo), float(hi))


def reply_instances(reply: Any) -> list[np.ndarray]:
    """Per ``<SEG>`` of a reply, an int32 label image of its objects (0 = background).

    Uses ``reply.instances`` where the engine split the masks into objects itself; else the connected
    components (8-connected) of each mask, which merge objects that touch.
    """
    instances = getattr(reply, "instances", None)
    if instances:
        return [np.asarray(i, dtype=np.int32) for i in instances]
    return [mask_components(m) for m in getattr(reply, "masks", None) or []]


def mask_components(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W) mask -> int32 labels of its 8-connected pieces."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), bool))
    return labels.astype(np.int32, copy=False)


def link_planes(label_planes: Sequence[np.ndarray], min_iou: float = 0.2, min_contained: float = 0.5) -> np.ndarray:
    """Label images of consecutive planes -> one (Z, H, W) int32 volume with consistent ids.

    Each plane's objects are matched one-to-one to the previous plane's (Hungarian assignment,
    `scipy.optimize.linear_sum_assignment`, maximising intersection over union). A pair can match when
    its IoU is at least ``min_iou``, or when at least ``min_contained`` of the smaller object lies in the
    larger: the cap of a round object is a few pixels inside a wide section, an IoU far below any
    useful threshold. Matched objects keep the earlier plane's id, others get the next new id, so an
    object that ends and another that starts later (or an object missing on a plane) get different ids,
    and two touching objects stay two. Ids in the input only separate objects within a plane; the output
    numbers objects 1..N in order of appearance.
    """
    for name, value in (("min_iou", min_iou), ("min_contained", min_contained)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    planes = [np.asarray(p) for p in label_planes]
    if not planes:
        return np.zeros((0, 0, 0), np.int32)
    shape = planes[0].shape
    for z, p in enumerate(planes):
        if p.ndim != 2 or p.shape != shape:
            raise ValueError(f"label plane {z} has shape {p.shape}; every plane must be 2-D {shape}")
        if not np.issubdtype(p.dtype, np.integer) and p.dtype != bool:
            raise ValueError(f"label plane {z} has dtype {p.dtype}; give integer labels (0 = background)")
    out = np.zeros((len(planes), *shape), np.int32)
    next_id = 1
    previous = None
    for z, plane in enumerate(planes):
        current, n = _compact(plane)
        mapping = np.zeros(n + 1, np.int32)
        if previous is not None and n:
            for cur, prev_id in _match(previous, current, n, float(min_iou), float(min_contained)):
                mapping[cur] = prev_id
        for cur in range(1, n + 1):
            if mapping[cur] == 0:
                mapping[cur] = next_id
                next_id += 1
        out[z] = mapping[current]
        previous = out[z]
    return out


def _compact(plane: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 1..n (0 stays background) and n."""
    values, inverse = np.unique(plane, return_inverse=True)
    inverse = inverse.reshape(plane.shape)
    if values[0] == 0:
        return inverse.astype(np.int64), len(values) - 1
    return inverse.astype(np.int64) + 1, len(values)


def _match(previous: np.ndarray, current: np.ndarray, n: int, min_iou: float,
           min_contained: float) -> list[tuple[int, int]]:
    """(current label, previous id) pairs of the one-to-one matching: the most pairs that may match
    (`link_planes`), and among those the highest total IoU."""
    from scipy.optimize import linear_sum_assignment

    prev_ids, prev_compact = np.unique(previous, return_inverse=True)
    prev_compact = prev_compact.reshape(previous.shape)
    m = len(prev_ids)  # compact index 0 is background when prev_ids[0] == 0
    if m == 0 or (m == 1 and prev_ids[0] == 0):
        return []
    pairs = np.bincount((prev_compact * (n + 1) + current).ravel(), minlength=m * (n + 1)).reshape(m, n + 1)
    area_prev = pairs.sum(axis=1)
    area_cur = pairs.sum(axis=0)
    rows = np.flatnonzero(prev_ids != 0)
    inter = pairs[rows][:, 1:].astype(np.float64)  # [objects before, objects now]
    union = area_prev[rows][:, None] + area_cur[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    smaller = np.minimum(area_prev[rows][:, None], area_cur[None, 1:]).astype(np.float64)
    contained = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    allowed = (inter > 0) & ((iou >= min_iou) | (contained >= min_contained))
    score = np.where(allowed, 1.0 + iou, 0.0)  # any allowed pair outranks every pair that is not
    r, c = linear_sum_assignment(-score)
    return [(int(j) + 1, int(prev_ids[rows[i]])) for i, j in zip(r, c, strict=True) if allowed[i, j]]


def link_replies(replies: Sequence[Any], min_iou: float = 0.2, min_contained: float = 0.5,
                 shape: tuple[int, int] | None = None) -> np.ndarray:
    """Replies of consecutive planes -> (Z, H, W) int32 objects linked across planes.

    The k-th ``<SEG>`` of every plane is linked with the k-th of the others (one answer's masks may be
    different structures); the objects of ``<SEG>`` k+1 are numbered after those of ``<SEG>`` k.
    A plane without an answer (None) or without that ``<SEG>`` is empty. ``shape`` (H, W) of the planes
    is needed only when no reply has a mask.
    """
    per_plane = [reply_instances(r) if r is not None else [] for r in replies]
    shape = next((inst[0].shape for inst in per_plane if inst), shape)
    if shape is None:
        raise ValueError("no reply has a mask; give the planes' shape")
    empty = np.zeros(shape, np.int32)
    volume = np.zeros((len(replies), *shape), np.int32)
    offset = 0
    for k in range(max(len(inst) for inst in per_plane)):
        linked = link_planes([inst[k] if k < len(inst) else empty for inst in per_plane], min_iou, min_contained)
        volume = np.where((linked > 0) & (volume == 0), linked + offset, volume)  # earlier <SEG> s keep their pixels
        offset += int(linked.max(initial=0))
    return volume
