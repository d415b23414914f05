"""How large the objects of a plane are, without a model: so prompts and tiles can be cut at the model's scale.

The bundled model's SAM learnt on 256-px frames whose objects span about ``MODEL_OBJECT_EXTENT`` pixels
(box side; median over the synthetic styles: fluorescence nuclei 20, cells 26, mitochondria 17, brightfield
cells 29, H&E nuclei 9, bacteria 36). Real objects are 5 to 300 px, so a crop around a prompt is chosen
so that the object spans about that many SAM pixels (see ``window.py``). A box gives the object's size
itself; a click does not, so its size is estimated here by scale-space blob detection (Lindeberg's
scale selection: the sigma at which the scale-normalised Laplacian of Gaussian is extreme), which works
for bright objects on dark ground and dark on bright alike.

numpy + scipy only; a few milliseconds per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Median box side (pixels) of a training object in the model's 256-px SAM frame.
MODEL_OBJECT_EXTENT = 28.0
#: The extent a prompt's object is given in SAM's 256-px input (``window.py``): larger than in training,
#: for a finer outline (SAM's mask is 64 x 64), and the realistic SAM stages train across both sizes.
#: Chosen on the tune images of the real-image benchmark (box / click Dice at 28, 40, 48, 56, 64:
#: 0.832 / 0.48, 0.849 / 0.62, 0.854 / 0.65, 0.851 / 0.66, 0.846 / 0.66 with sam27's SAM).
PROMPT_OBJECT_EXTENT = 48.0
#: The same as an equivalent diameter (sqrt(4 area / pi)); the synthetic styles' median is about 17.
MODEL_OBJECT_DIAMETER = 18.0
#: A click's crop assumes its object is this many times the blob diameter measured under it (1.5 and 2.0
#: gave click Dice 0.660 and 0.653 on the real-image benchmark's tune images).
CLICK_EXTENT_FACTOR = 1.5
#: Object diameters (pixels) the estimators consider.
MIN_DIAMETER, MAX_DIAMETER = 4.0, 400.0
#: Scales tried per octave (plane estimate; a click's estimate, which a crop side rounds to a quarter
#: octave anyway and which runs on every click, tries half as many).
_PER_OCTAVE = 4


def gray_plane(array: np.ndarray) -> np.ndarray:
    """A float32 (H, W) plane of any (H, W) / (H, W, C) array: channels averaged, robustly scaled to 0..1."""
    plane = np.asarray(array)
    if plane.ndim == 3:
        plane = plane[..., :3].astype(np.float32).mean(axis=-1)
    plane = plane.astype(np.float32, copy=False)
    lo, hi = np.percentile(plane[:: max(1, plane.shape[0] // 256), :: max(1, plane.shape[1] // 256)], (0.5, 99.5))
    if hi <= lo:
        return np.zeros(plane.shape, np.float32)
    return np.clip((plane - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)  # float32 scalars: no float64 upcast


def _sigmas(lo_diameter: float, hi_diameter: float, per_octave: int = _PER_OCTAVE) -> np.ndarray:
    """Geometric series of LoG sigmas for blob diameters lo..hi (a disc of diameter d peaks at d / (2 sqrt 2))."""
    lo, hi = lo_diameter / (2 * math.sqrt(2)), hi_diameter / (2 * math.sqrt(2))
    n = max(2, int(math.ceil(math.log2(hi / lo) * per_octave)) + 1)
    return np.geomspace(lo, hi, n)


def _block_mean(plane: np.ndarray, factor: int) -> np.ndarray:
    """``plane`` reduced by averaging ``factor`` x ``factor`` blocks (edge rows/columns that do not fill a block dropped)."""
    if factor <= 1:
        return plane
    h, w = (plane.shape[0] // factor) * factor, (plane.shape[1] // factor) * factor
    return plane[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _normalised_log(patch: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    # the LoG of a constant is 0, but scipy's truncated kernel leaks ~2e-3 x the level (sigma-normalised):
    # remove the level first, so a flat (e.g. saturated) patch gives no response
    return (sigma**2) * ndi.gaussian_laplace(patch - np.float32(patch.mean()), sigma, mode="reflect")


def local_object_diameter(gray: np.ndarray, point: tuple[float, float], max_diameter: float = MAX_DIAMETER) -> float | None:
    """Diameter (pixels) of the blob under ``point`` (y, x): the scale of the strongest normalised-LoG
    response at the point, over both polarities; None when no scale responds (a flat patch).

    Only a patch of about three blob sizes around the point is filtered per scale, so a click on a
    4096-px plane costs as little as one on a 256-px plane.
    """
    h, w = gray.shape
    y, x = int(round(point[0])), int(round(point[1]))
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"point {point} is outside the plane of shape {gray.shape}")
    max_diameter = min(max_diameter, 2.0 * max(h, w))
    best, best_sigma = 0.0, None
    sigmas = _sigmas(MIN_DIAMETER, max_diameter, per_octave=max(1, _PER_OCTAVE // 2))
    for sigma in sigmas:
        reach = int(math.ceil(4 * sigma))
        y0, y1, x0, x1 = max(0, y - reach), min(h, y + reach + 1), max(0, x - reach), min(w, x + reach + 1)
        step = max(1, int(sigma // 4))  # big scales on a block-averaged patch: same response, fewer pixels
        patch = _block_mean(gray[y0:y1, x0:x1], step)  # averaged, not strided: noise must shrink as it would
        if min(patch.shape) < 3:
            break
        row, col = min((y - y0) // step, patch.shape[0] - 1), min((x - x0) // step, patch.shape[1] - 1)
        value = abs(float(_normalised_log(patch, sigma / step)[row, col]))
        if value > best:
            best, best_sigma = value, sigma
    if best_sigma is None or best < 1e-3:
        return None
    return float(2 * math.sqrt(2) * best_sigma)


def estimate_object_diameter(gray: np.ndarray, max_side: int = 512) -> float | None:
    """Typical object diameter (pixels) of a plane: the scale whose normalised-LoG extrema are strongest.

    The plane is block-averaged to at most ``max_side`` pixels first (objects smaller than a couple of
    reduced pixels are then out of reach, which only matters for tiny objects on huge planes). Returns
    None for a flat plane.
    """
    from scipy import ndimage as ndi

    plane = np.asarray(gray, dtype=np.float32)
    if plane.ndim != 2:
        raise ValueError(f"estimate_object_diameter() takes one 2-D plane, got shape {plane.shape}")
    factor = max(1, int(math.ceil(max(plane.shape) / max_side)))
    plane = _block_mean(plane, factor)
    if float(plane.max() - plane.min()) < 1e-6:
        return None
    lo = max(MIN_DIAMETER / factor, 2.5)
    hi = min(MAX_DIAMETER / factor, max(plane.shape) / 2.0)
    if hi <= lo:
        return None
    scores = []
    sigmas = _sigmas(lo, hi)
    for sigma in sigmas:
        step = max(1, int(sigma // 3))  # a pyramid: big scales on a coarser plane, same normalised response
        coarse = _block_mean(plane, step)
        response = _normalised_log(coarse, sigma / step)
        size = max(3, int(2 * sigma / step) | 1)
        strongest = []
        for signed in (response, -response):  # dark blobs on bright ground, bright on dark
            peaks = (signed == ndi.maximum_filter(signed, size=size)) & (signed > 0)
            values = np.sort(signed[peaks])[::-1]
            if values.size:
                strongest.append(float(values[: max(1, values.size // 4)].mean()))  # the top quarter of peaks
        scores.append(max(strongest) if strongest else 0.0)
    scores = np.asarray(scores)
    if scores.max() < 1e-3:
        return None
    return float(2 * math.sqrt(2) * sigmas[int(np.argmax(scores))] * factor)


def clamp_extent(extent: float | None, known: Sequence[float]) -> float | None:
    """An estimated object extent kept inside a known ``[low, high]`` range (e.g. a fine-tuned model's
    annotated objects); without an estimate, their geometric middle; unchanged when no range is known."""
    if len(known) != 2:
        return extent
    low, high = float(min(known)), float(max(known))
    if extent is None:
        return math.sqrt(low * high)
    return min(max(extent, low), high)
