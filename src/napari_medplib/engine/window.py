"""Prompt windows: segment inside a crop chosen so the prompted object has the size the model knows.

SAM-Med2D sees a 256-px input. The bundled model learnt on 256-px synthetic frames whose objects span
about 28 pixels (``scale.MODEL_OBJECT_EXTENT``), and its realistic SAM stages on crops where they span
about 15 to 90; real objects span 5 to 300 pixels. Squeezing a
1000-px frame into 256 px shrinks a nucleus to a few SAM pixels, and a 5-px bacterium on a 256-px
crop is as foreign to the model as a 250-px cell. So (like micro-sam and SAM-Med2D users who crop or
tile) ``Session.segment`` runs SAM on a square crop around the prompts, resized to SAM's input, and
pastes the masks back.

Crop rule (``window="auto"``):

* the object's extent: a box's (or mask prior's) longer side; for clicks, the spread of the clicks plus
  the clicked object's estimated size (``object_extent``, from ``scale.local_object_diameter``);
* side = extent x SAM input / ``target_extent`` (the object then spans about ``target_extent`` SAM
  pixels; default ``scale.PROMPT_OBJECT_EXTENT``, 48), at least extent + ``MIN_CONTEXT`` and ``MIN_SIDE``, rounded up to a quarter
  octave so nearby prompts of similar size share a crop (and its cached SAM embedding);
* an int ``window`` asks for that side instead (grown to extent + ``MARGIN`` if the prompts need it);
* the crop is centred on the prompts, its origin snapped to a grid of a quarter side, so clicks a few
  pixels apart share the same crop; the prompts stay at least ``MARGIN / 2`` pixels (or a quarter of the
  spare room) from the crop's edges (less only at the image border);
* it is shifted to stay inside the image (clipped on an axis the image is shorter than the side);
  a side reaching the image's longer side means the whole image (``None``).

Contrast is that of the whole plane (the crop is cut from the whole plane's model RGB, so a crop of
mostly background is not re-stretched). A mask prior is a full-size bool plane: it is cut to the same
crop, which its bounding box is part of, so it always lies inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..cache import content_key
from ..imaging import DEFAULT_PERCENTILES, _percentile_limits, describe_plane
from . import image as image_module
from .errors import SessionInputError
from .image import ModelView, make_view
from .reply import SegmentResult

#: Pixels added to the prompts' extent for an explicit int window (room for snapping).
MARGIN = 64
#: An "auto" crop is at least this many pixels wider than the object, and at least MIN_SIDE wide.
MIN_CONTEXT = 8
MIN_SIDE = 32

Window = tuple[int, int, int, int]  # (y0, x0, y1, x1), end-exclusive image pixels


@dataclass
class WindowedSegmentResult(SegmentResult):
    """`SegmentResult` plus the image area SAM saw: ``window`` (y0, x0, y1, x1), end-exclusive.

    The whole plane gives (0, 0, H, W). Masks are always full-size (H, W), zero outside the window.
    """

    window: Window | None = None


def check_window(value) -> str | int | None:
    """Normalise a ``window`` argument: "auto", None/"none" (whole image) or a positive int side."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("none", "off", "0"):
            return None
        if text.isdigit():
            value = int(text)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) == 0:
            return None
        if int(value) > 0:
            return int(value)
    raise SessionInputError(
        f"window must be 'auto', None (whole image) or a positive crop side in pixels, got {value!r}"
    )


def prompts_bbox(points, box, prior) -> tuple[int, int, int, int]:
    """Inclusive pixel bounding box (y0, x0, y1, x1) of all prompts (checked, image-clipped arrays)."""
    ys: list[float] = []
    xs: list[float] = []
    if points is not None:
        ys += [float(points[:, 0].min()), float(points[:, 0].max())]
        xs += [float(points[:, 1].min()), float(points[:, 1].max())]
    if box is not None:
        ys += [float(box[0]), float(box[2])]
        xs += [float(box[1]), float(box[3])]
    if prior is not None:
        rows = np.flatnonzero(np.asarray(prior).any(axis=1))
        cols = np.flatnonzero(np.asarray(prior).any(axis=0))
        ys += [float(rows[0]), float(rows[-1])]
        xs += [float(cols[0]), float(cols[-1])]
    return math.floor(min(ys) + 0.5), math.floor(min(xs) + 0.5), math.floor(max(ys) + 0.5), math.floor(max(xs) + 0.5)


def _axis(lo: int, hi: int, length: int, side: int) -> tuple[int, int]:
    """Start/end of a ``side`` span on an axis of ``length`` holding pixels lo..hi, centred and snapped."""
    if side >= length:
        return 0, length
    step = max(1, side // 4)
    start = round(((lo + hi + 1) / 2 - side / 2) / step) * step
    spare = min(MARGIN // 2, (side - (hi - lo + 1)) // 4)  # keep the prompts this far from the crop edge
    start = max(min(start, lo - spare), hi + 1 + spare - side)
    start = int(min(max(start, 0), length - side))
    return start, start + side


def auto_side(extent: float, sam_size: int, target_extent: float) -> int:
    """Crop side for an object spanning ``extent`` pixels: it then spans ``target_extent`` of SAM's input.

    Rounded up to a quarter octave (2 ** (k / 4)) so nearby prompts of similar size share a crop.
    """
    wanted = max(extent * sam_size / target_extent, extent + MIN_CONTEXT, MIN_SIDE)
    return int(math.ceil(2 ** (math.ceil(4 * math.log2(wanted) - 1e-9) / 4)))


def choose_window(image_hw, sam_size: int, points, box, prior, window="auto", *,
                  object_extent: float | None = None, target_extent: float | None = None) -> Window | None:
    """The crop (y0, x0, y1, x1) to segment in, or None for the whole plane (see the module docstring).

    ``object_extent``: the clicked object's estimated extent in pixels (clicks only; a box or prior
    gives its own); ``target_extent``: the extent the object gets in SAM's frame (default
    ``scale.PROMPT_OBJECT_EXTENT``).
    """
    from .scale import MODEL_OBJECT_EXTENT, PROMPT_OBJECT_EXTENT

    window = check_window(window)
    if window is None:
        return None
    h, w = (int(v) for v in image_hw)
    y0, x0, y1, x1 = prompts_bbox(points, box, prior)
    extent = max(y1 - y0 + 1, x1 - x0 + 1)
    if window == "auto":
        if box is None and prior is None:  # clicks: their spread plus the object they stand on
            extent = extent + (object_extent if object_extent else MODEL_OBJECT_EXTENT)
        side = auto_side(extent, sam_size, target_extent or PROMPT_OBJECT_EXTENT)
    else:
        side = max(int(window), extent + MARGIN)
    if side >= max(h, w):
        return None
    top, bottom = _axis(y0, y1, h, side)
    left, right = _axis(x0, x1, w, side)
    return top, left, bottom, right


def whole_plane_limits(array: np.ndarray, rgb: bool | None):
    """Percentile contrast of the whole plane, as ``to_model_rgb`` would pick it (None = 8-bit pass-through).

    Used only for block-reduced (very large) planes, whose model RGB cannot be cut at native resolution;
    percentiles come from a strided sample as large as the reduced plane.
    """
    if array.dtype in (np.uint8, np.bool_):
        return None
    layout = describe_plane(array, rgb)
    step = max(1, math.ceil(max(array.shape[:2]) / image_module.LARGE_SIDE))
    sample = array[::step, ::step]
    if layout.rgb:
        return _percentile_limits(sample[..., :3], DEFAULT_PERCENTILES)
    if layout.channels == 1:
        return _percentile_limits(sample if sample.ndim == 2 else sample[..., 0], DEFAULT_PERCENTILES)
    return [_percentile_limits(sample[..., c], DEFAULT_PERCENTILES) for c in range(layout.channels)]


def crop_view(view: ModelView, image, window: Window, contrast_limits, rgb) -> ModelView:
    """The model's view of ``window`` at native resolution, with the whole plane's contrast and colours."""
    y0, x0, y1, x1 = window
    if view.factor == 1:  # the mapping to RGB is per pixel once the limits are fixed: cut the plane's RGB
        crop = np.ascontiguousarray(view.rgb[y0:y1, x0:x1])
        crop.setflags(write=False)
        return ModelView(crop, content_key(crop), (y1 - y0, x1 - x0), 1)
    array = np.asarray(image)
    layout_rgb = describe_plane(array, rgb).rgb
    limits = contrast_limits if contrast_limits is not None else whole_plane_limits(array, layout_rgb)
    return make_view(array[y0:y1, x0:x1], limits, layout_rgb)


def shift_prompts(window: Window, points, box, prior):
    """Checked prompts in image pixels -> the same prompts in the crop's pixels."""
    y0, x0, y1, x1 = window
    if points is not None:
        points = points - np.array([y0, x0], dtype=points.dtype)
    if box is not None:
        box = box - np.array([y0, x0, y0, x0], dtype=box.dtype)
    if prior is not None:
        prior = np.asarray(prior)[y0:y1, x0:x1]
    return points, box, prior


def paste_masks(masks: list[np.ndarray], window: Window, image_hw) -> list[np.ndarray]:
    """Crop-size masks -> full-size bool (H, W) masks, False outside the window."""
    y0, x0, y1, x1 = window
    out = []
    for mask in masks:
        full = np.zeros(tuple(image_hw), bool)
        full[y0:y1, x0:x1] = mask
        out.append(full)
    return out


def mirror_prompts(view: ModelView, points, box, prior, flip_y: bool, flip_x: bool):
    """(mirrored view, points, box, prior): the view's RGB and the prompts (view pixels) flipped.

    Only for unreduced views (``factor == 1``), where a view pixel is an image pixel.
    """
    if not (flip_y or flip_x):
        return view, points, box, prior
    h, w = view.rgb.shape[:2]
    rgb = view.rgb[::-1] if flip_y else view.rgb
    rgb = np.ascontiguousarray(rgb[:, ::-1] if flip_x else rgb)
    rgb.setflags(write=False)
    mirrored = ModelView(rgb, content_key(rgb), view.image_hw, view.factor)
    if points is not None:
        points = points.copy()
        if flip_y:
            points[:, 0] = h - 1 - points[:, 0]
        if flip_x:
            points[:, 1] = w - 1 - points[:, 1]
    if box is not None:
        y0, x0, y1, x1 = (float(v) for v in box)
        if flip_y:
            y0, y1 = h - 1 - y1, h - 1 - y0
        if flip_x:
            x0, x1 = w - 1 - x1, w - 1 - x0
        box = np.array([y0, x0, y1, x1], dtype=np.asarray(box).dtype)
    if prior is not None:
        prior = unmirror(np.asarray(prior), flip_y, flip_x)
    return mirrored, points, box, prior


def unmirror(mask: np.ndarray, flip_y: bool, flip_x: bool) -> np.ndarray:
    """A mask of a mirrored view back in the view's orientation (mirroring is its own inverse)."""
    if flip_y:
        mask = mask[::-1]
    if flip_x:
        mask = mask[:, ::-1]
    return np.ascontiguousarray(mask)
