"""Region view: a question about a small region of a large plane reads the region's tokens from a detailed crop.

Why: MedPLIB's CLIP tower sees the whole plane at its input size ``S`` (336 px). On a 4096 x 4096
microscopy plane one encoder pixel is ~12 plane pixels, so a 60-px nucleus becomes ~5 px, under one
patch of the 24 x 24 grid the region encoder pools from: its token holds almost nothing of the nucleus.
With the region view the image tokens stay those of the whole plane (the model still sees it all for
context), and only the region tokens are pooled from CLIP features of a crop around the regions,
encoded where the regions span a useful number of patches.

The rule (`plan_crop`), on the plane as the model sees it (``view.rgb``; planes above 4096 px are
block-reduced first, see ``engine.image``), with ``b`` the longest side of the bounding box of all
regions of the question (as the model reads them) and ``L`` the plane's longest side:

* the plane must be large: ``L > PLANE_FACTOR * S`` (2 x 336 = 672 px); smaller planes are read whole,
  exactly as before (every small image gives bit-identical answers);
* the crop is a square of side ``c = max(CONTEXT * b, S)`` (the regions plus twice their size of
  surroundings, never finer than one plane pixel per encoder pixel), centred on the regions' box and
  shifted, not shrunk, to stay inside the plane (a plane thinner than ``c`` gives its full extent);
* it is used only when it gains at least 2x resolution: ``c <= MAX_CROP_FRACTION * L`` (half the plane).
  Regions far apart (a large joint box) therefore keep the plane view.

The crop is encoded by the model's own CLIP tower and preprocessing (longest side to ``S``, centre pad,
normalise), one pass per scale. ``scales`` other than ``(1,)`` also encode the crop at ``n * S`` as an
``n x n`` chessboard of ``S``-px tiles, stitched into one ``n g x n g`` map and area-pooled to the ``g x g``
grid (``llama3med.multiscale``'s tiling helpers); the scales' maps are averaged, never concatenated, so the
region encoder gets features of the width and grid it was trained on. Region masks (and a box's object)
are mapped to the crop's frame. On models whose region tokens also read the frame (region geometry,
brightness, counts), those are measured on the crop's frame too: the crop's brightness and count peaks.
Note: the geometry then says where the region lies *in the crop* (near its centre) and how large it
is *relative to the crop*; "where" and "how big" questions about a region of a large plane are better
asked with ``region_view = "plane"``.

Setting: ``family.region_view`` (``session.adapter.region_view``), ``"auto"`` (default: the rule above)
or ``"plane"`` (always the whole plane, as before). ``region_scales`` (default ``(1,)``) picks the scales.

How it reaches the model: `encode_regions` (``regions.py``) decides on a crop for the turn's regions
and returns it with the region masks (``RegionInputs.crop``); generation passes the plane's features with
the crop's patch features in place of the plane's (`with_crop`) to the decoder only: the prompt prefix and
the familiarity check see the whole plane. Crop features are cached in the session's
feature cache, keyed by the plane's content key, the crop box, the scales and the input size.
`Session.ask_planes` picks the same crops per plane and swaps the rows of its batched features
(`with_crops`), so its answers stay those of `Session.ask`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...engine.image import ModelView
from ...regions import Region

__all__ = ["CONTEXT", "MAX_CROP_FRACTION", "MODES", "PLANE_FACTOR", "Crop", "crop_mask", "plan_crop"]

#: "auto": the rule decides; "plane": the whole plane, always.
MODES = ("auto", "plane")
#: The plane's longest side must exceed this many encoder inputs for the region view to be considered.
PLANE_FACTOR = 2.0
#: The crop's side, in multiples of the regions' bounding-box side (the regions and their surroundings).
CONTEXT = 3.0
#: The crop is used only when its side is at most this fraction of the plane's (>= 2x resolution gained).
MAX_CROP_FRACTION = 0.5


@dataclass(frozen=True)
class Crop:
    """A crop of the plane the model sees: rows ``y0:y1``, columns ``x0:x1`` (view pixels, half-open)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def hw(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.y0, self.x0, self.y1, self.x1)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"region_view must be one of {MODES}, got {mode!r}")
    return mode


def plan_crop(plane_hw: tuple[int, int], bbox: tuple[int, int, int, int] | None, encoder_size: int, *,
              plane_factor: float = PLANE_FACTOR, context: float = CONTEXT,
              max_fraction: float = MAX_CROP_FRACTION) -> Crop | None:
    """The crop the rule picks (module docstring) for regions with inclusive box ``bbox`` (y0, x0, y1, x1)
    on a plane of ``plane_hw`` (view pixels); None where the plane view is kept."""
    h, w = int(plane_hw[0]), int(plane_hw[1])
    longest = max(h, w)
    if bbox is None or longest <= plane_factor * encoder_size:
        return None
    y0, x0, y1, x1 = (int(v) for v in bbox)
    side = max(math.ceil(context * max(y1 - y0 + 1, x1 - x0 + 1)), int(encoder_size))
    if side > max_fraction * longest:
        return None
    top = _place((y0 + y1 + 1) / 2, min(side, h), h)
    left = _place((x0 + x1 + 1) / 2, min(side, w), w)
    return Crop(top, left, top + min(side, h), left + min(side, w))


def _place(centre: float, side: int, extent: int) -> int:
    """Start of a ``side``-long window centred on ``centre``, shifted to lie inside ``[0, extent)``."""
    return int(min(max(math.floor(centre - side / 2), 0), extent - side))


def view_bbox(regions: Sequence[Region], view: ModelView) -> tuple[int, int, int, int] | None:
    """Inclusive box (y0, x0, y1, x1) of all ``regions`` in view pixels (None when all are empty)."""
    boxes = []
    for region in regions:
        crop, (r0, c0) = region.crop(view.image_hw)
        rows, cols = np.nonzero(crop.any(axis=1))[0], np.nonzero(crop.any(axis=0))[0]
        if rows.size:
            boxes.append((r0 + rows[0], c0 + cols[0], r0 + rows[-1], c0 + cols[-1]))
    if not boxes:
        return None
    y0, x0, y1, x1 = np.array(boxes).T
    f = view.factor
    return (int(y0.min()) // f, int(x0.min()) // f, int(y1.max()) // f, int(x1.max()) // f)


def crop_mask(region: Region, view: ModelView, crop: Crop) -> np.ndarray:
    """``region`` as a bool mask on the crop (view pixels; the parts outside the crop dropped)."""
    out = np.zeros(crop.hw, bool)
    mask, (r0, c0) = region.crop(view.image_hw)
    rr, cc = np.nonzero(mask)
    rr, cc = (rr + r0) // view.factor - crop.y0, (cc + c0) // view.factor - crop.x0
    inside = (rr >= 0) & (rr < crop.hw[0]) & (cc >= 0) & (cc < crop.hw[1])
    out[rr[inside], cc[inside]] = True
    return out


# ------------------------------------------------------------------------------------ the family's side
def choose(family, regions: Sequence[Region], view: ModelView) -> Crop | None:
    """The crop for this question's ``regions`` (as the model reads them), per the family's setting."""
    if check_mode(family.region_view) == "plane" or not regions:
        return None
    size = int(family.clip.size)
    if max(view.rgb.shape[:2]) <= PLANE_FACTOR * size:  # cheap exit before any mask is drawn
        return None
    return plan_crop(view.rgb.shape[:2], view_bbox(regions, view), size)


def with_crop(family, view: ModelView, crop: Crop | None, features, on_progress=None):
    """``features`` (the plane's) when ``crop`` is None, else the plane's image tokens with the crop's
    patch features (and the crop's brightness and count peaks where the model reads them)."""
    if crop is None:
        return features
    from ...model.medplib import ImageFeatures

    detail = crop_features(family, view, crop, on_progress)
    return ImageFeatures(detail.patch_features, features.image_tokens, detail.brightness, detail.count_peaks)


def with_crops(family, views: Sequence[ModelView], crops: Sequence[Crop | None], features):
    """Batched plane ``features`` [B, ...] with row ``b``'s patch features (brightness, count peaks) taken
    from ``crops[b]`` where it is not None: `Session.ask_planes`' form of `take`."""
    if all(c is None for c in crops):
        return features
    import torch

    from ...model.medplib import ImageFeatures

    details = [None if c is None else crop_features(family, v, c) for v, c in zip(views, crops, strict=True)]

    def rows(name: str):
        whole = getattr(features, name)
        if whole is None:
            return None
        return torch.cat([whole[b : b + 1] if d is None else getattr(d, name).to(whole.dtype)
                          for b, d in enumerate(details)])

    return ImageFeatures(rows("patch_features"), features.image_tokens, rows("brightness"), rows("count_peaks"))


def scales_of(family) -> tuple[int, ...]:
    scales = tuple(int(n) for n in getattr(family, "region_scales", (1,)))
    if not scales or any(n < 1 for n in scales):
        raise ValueError(f"region_scales must be positive tile counts, got {scales}")
    return scales


def crop_features(family, view: ModelView, crop: Crop, on_progress=None):
    """`ImageFeatures` of the crop (``image_tokens`` None): patch features [1, g*g, Dv] averaged over the
    scales, brightness and count peaks of the crop at the input size where the model reads them. Cached."""
    from ...model.medplib import ImageFeatures
    from ...model.preprocess import frame_brightness, prepare_clip_image

    model, settings, scales = family.model, family.clip, scales_of(family)
    key = ("clip-region", view.key, crop.box, scales, int(settings.size))
    found = family.caches.features.get(key)
    if found is not None:
        return found
    if on_progress:
        on_progress("embedding the region's detail (CLIP)", 0, 1)
    rgb = np.ascontiguousarray(view.rgb[crop.y0 : crop.y1, crop.x0 : crop.x1])
    base = prepare_clip_image(rgb, settings.size, settings.mean, settings.std)
    patch = encode_scales(model, rgb, base, scales, settings)
    brightness = frame_brightness(base)[None].to(model.device) if model.regions_read_brightness else None
    peaks = model.count_peaks(base.pixel_values) if model.counter is not None else None
    found = ImageFeatures(patch, None, brightness, peaks)
    family.caches.features.put(key, found)
    if on_progress:
        on_progress("embedding the region's detail (CLIP)", 1, 1)
    return found


def encode_scales(model, rgb: np.ndarray, base, scales: Sequence[int], settings):
    """[1, g*g, Dv] CLIP patch features of ``rgb``: per scale ``n``, the image at ``n * S`` as ``n x n`` tiles
    through the tower, stitched and area-pooled to the ``g x g`` grid; the mean over the scales. Scale 1
    is the plain CLIP input ``base`` (so ``scales=(1,)`` is exactly a crop-then-encode)."""
    import torch
    import torch.nn.functional as F

    from ...model.preprocess import prepare_clip_image
    from ..llama3med.multiscale import merge_tiles, split_tiles, tokens_to_map

    maps = []
    for n in sorted(set(scales)):
        pixels = base if n == 1 else prepare_clip_image(rgb, n * settings.size, settings.mean, settings.std)
        with torch.no_grad():
            tokens = model.vision_tower(split_tiles(pixels.pixel_values, n).to(model.device))  # [n*n, g*g, Dv]
        if n == 1 and len(scales) == 1:
            return tokens
        stitched = merge_tiles(tokens_to_map(tokens), n)  # [1, Dv, n*g, n*g]
        grid = stitched.shape[-1] // n
        maps.append(F.interpolate(stitched.float(), size=(grid, grid), mode="area") if n > 1 else stitched.float())
    mean = torch.stack(maps).mean(dim=0)  # [1, Dv, g, g]
    return mean.flatten(2).transpose(1, 2).to(tokens.dtype)  # [1, g*g, Dv]
