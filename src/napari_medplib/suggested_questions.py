"""Example questions for an image, in the wordings the bundled model was trained on.

The model answers its training wordings well and rewordings badly ("How many nuclei are there?" is
answered; "count the nuclei for me please" much less so). `image_kind` makes a cheap, model-free guess at
what kind of image a plane is, and `suggested_questions` gives two or three questions for that kind,
every one of them a trained wording (`WORDINGS`).

No Qt, no napari, no torch: the guess reads a strided subsample of at most about `SAMPLE_SIDE` squared
pixels, never a copy of the whole plane, so it is cheap on any in-memory plane whatever its size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DESCRIBE = "Describe the image in a few words."
MODALITY = "What type of imaging is this?"
STAIN = "Which stain does this image show?"
COUNT = "How many {nouns} are there?"
SEGMENT = "Please segment the {nouns}."
REGION = "What is in <region>?"

#: The trained wordings the suggestions are drawn from ({nouns}: a plural noun such as "nuclei").
WORDINGS = (DESCRIBE, MODALITY, STAIN, COUNT, SEGMENT, REGION)

#: The kinds `image_kind` tells apart.
KINDS = ("fluorescence", "he", "ihc", "transmitted", "unknown")

#: The longest side of the subsample `image_kind` looks at.
SAMPLE_SIDE = 512

#: What the counting and segmenting questions name, per kind.
_NOUNS = {"fluorescence": "nuclei", "he": "nuclei", "ihc": "nuclei", "transmitted": "cells"}


def sample_plane(data: Any, rgb: bool, side: int = SAMPLE_SIDE) -> np.ndarray:
    """A strided subsample (at most about ``side`` pixels a side) of one 2-D plane of ``data``.

    ``data`` is any array-like with ``shape`` and numpy indexing (numpy, dask, zarr): (..., H, W), or
    (..., H, W, C) when ``rgb``. Leading axes are indexed at their middle (the middle of a z-stack is
    rarely empty). Only the sampled pixels are read; the result is a small numpy array.
    """
    shape = tuple(int(s) for s in np.shape(data))
    spatial = shape[:-1] if rgb and len(shape) >= 3 else shape
    if len(spatial) < 2:
        return np.asarray(data)
    h, w = spatial[-2:]
    step = max(1, math.ceil(max(h, w) / max(int(side), 1)))
    lead = tuple(s // 2 for s in spatial[:-2])
    return np.asarray(data[(*lead, slice(None, None, step), slice(None, None, step))])


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return values[np.isfinite(values)]


def _dark_share(grey: np.ndarray) -> float | None:
    """The share of pixels in the darkest fifth of the intensity range (None: a constant plane)."""
    values = _finite(grey).ravel()
    if values.size < 16:
        return None
    lo, hi = np.percentile(values, [0.5, 99.5])
    if not hi > lo:
        return None
    return float(np.mean(values < lo + 0.2 * (hi - lo)))


def _grey_kind(grey: np.ndarray) -> str:
    """Fluorescence (mostly dark background, bright objects) or transmitted light (bright or mid-grey
    background: brightfield, phase contrast, EM)."""
    dark = _dark_share(grey)
    if dark is None:
        return "unknown"
    return "fluorescence" if dark >= 0.4 else "transmitted"


def _colour_kind(rgb: np.ndarray) -> str:
    """H&E (pink/purple on white), IHC (brown DAB, usually with a blue counterstain), a dark-background
    colour image (fluorescence), or grey RGB judged on its brightness."""
    pixels = np.asarray(rgb, dtype=np.float32)[..., :3].reshape(-1, 3)
    pixels = pixels[np.isfinite(pixels).all(axis=1)]
    if len(pixels) < 16:
        return "unknown"
    top = float(np.percentile(pixels, 99.5))
    low = float(np.percentile(pixels, 0.5))
    if not top > low:
        return "unknown"
    pixels = np.clip((pixels - min(low, 0.0)) / (top - min(low, 0.0)), 0.0, 1.0)
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    grey = pixels.mean(axis=1)
    coloured = (pixels.max(axis=1) - pixels.min(axis=1)) > 0.08
    if coloured.mean() < 0.02:  # grey stored as RGB
        return _grey_kind(grey)
    dark = _dark_share(grey)
    if dark is None:
        return "unknown"
    if dark >= 0.4:  # coloured objects on a dark background: a fluorescence composite
        return "fluorescence"
    r, g, b = r[coloured], g[coloured], b[coloured]
    brown = (r >= g) & (g >= b) & (r - b > 0.08) & (g - b > 0.25 * (r - b))  # DAB: red > green > blue
    bluish = b > g  # eosin pink and haematoxylin purple/blue both have more blue than green
    if brown.mean() >= 0.15:
        return "ihc"
    if bluish.mean() >= 0.5:
        return "he"
    return "unknown"


def image_kind(plane: np.ndarray, rgb: bool) -> str:
    """A cheap, model-free guess at what kind of image ``plane`` is: one of `KINDS`.

    "fluorescence": a mostly dark background with bright objects; "he": RGB, pink/purple (haematoxylin
    and eosin); "ihc": RGB with brown DAB; "transmitted": a bright or mid-grey background (brightfield,
    phase contrast, EM); "unknown": anything else (a constant or empty plane, an unusual colour image).

    ``plane``: (H, W), or (H, W, 3 or 4) with ``rgb``; uint8, uint16 or float (NaNs ignored). Larger
    arrays are read at the middle of their leading axes. Only a strided subsample is read (`sample_plane`).
    """
    colour = bool(rgb) and np.ndim(plane) >= 3 and np.shape(plane)[-1] in (3, 4)
    sample = sample_plane(plane, colour)
    if sample.size == 0:
        return "unknown"
    if colour:
        return _colour_kind(sample)
    if sample.ndim != 2:
        return "unknown"
    return _grey_kind(sample)


def suggested_questions(kind: str) -> list[str]:
    """Two or three example questions for an image of ``kind`` (`image_kind`), each a trained wording."""
    nouns = _NOUNS.get(kind)
    if nouns is None:
        return [DESCRIBE, MODALITY]
    count, segment = COUNT.format(nouns=nouns), SEGMENT.format(nouns=nouns)
    if kind in ("he", "ihc"):
        return [STAIN, count, segment]
    return [count, segment, MODALITY]


def is_trained_wording(question: str) -> bool:
    """Whether ``question`` is one of `WORDINGS` (with any plural noun in place of {nouns})."""
    import re

    for wording in WORDINGS:
        pattern = re.escape(wording).replace(re.escape("{nouns}"), r"[a-z][a-z ]*")
        if re.fullmatch(pattern, question):
            return True
    return False
