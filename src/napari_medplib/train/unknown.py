"""Images unlike any microscopy: the "I can't tell" examples of training, and the benchmark's probes.

Why: a model that has seen only microscopy answers every image as if it were one ("phase-contrast
microscopy of bacteria" for random noise). Training shows it noise of several kinds and photographs,
each answered with ``wording.CANT_TELL``. The photographs are scikit-image's bundled ones, split by
name: ``TRAINING_PHOTOS`` for training, ``REPORT_PHOTOS`` only for the benchmark. Noise for the
benchmark uses seeds training never draws (``REPORT_SEED_BASE``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from .datatypes import Sample

#: scikit-image photographs (bundled with the package, no download) that training sees.
#: Close-up textures (brick, grass, gravel) are left out: they taught "I can't tell" to textured tissue and EM.
TRAINING_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "page", "text", "colorwheel",
                   "logo", "clock", "horse")
#: Photographs only the benchmark shows (never trained on).
REPORT_PHOTOS = ("camera", "coins", "moon", "motorcycle_right")
NOISE_KINDS = ("gaussian", "uniform", "smooth", "salt_pepper", "rgb")
REPORT_SEED_BASE = 10**9  # noise seeds at or above this are the benchmark's


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as uint8 (H, W) or (H, W, 3); "motorcycle_left/right" are the stereo pair.
    Read once per process (training draws windows of the same few photographs every step); read-only."""
    import skimage.data as data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(data, name)()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)).astype(np.uint8)
    image = np.array(image)  # our own copy, shared by every caller: read-only
    image.flags.writeable = False
    return image


def noise(kind: str, rng: np.random.Generator, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """One noise image of ``kind`` (uint8 or uint16; RGB for "rgb")."""
    h, w = size
    if kind == "gaussian":
        level, spread = rng.uniform(30, 200), rng.uniform(5, 60)
        image = rng.normal(level, spread, size)
    elif kind == "uniform":
        image = rng.uniform(0, 255, size)
    elif kind == "smooth":
        image = ndi.gaussian_filter(rng.normal(0, 1, size), rng.uniform(1.5, 8))
        image = 255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)
    elif kind == "salt_pepper":
        image = np.full(size, rng.uniform(60, 190))
        hits = rng.random(size)
        share = rng.uniform(0.02, 0.2)
        image[hits < share / 2] = 0
        image[hits > 1 - share / 2] = 255
    elif kind == "rgb":
        image = rng.uniform(0, 255, (h, w, 3))
        if rng.random() < 0.5:
            image = ndi.gaussian_filter(image, (rng.uniform(0.5, 4), rng.uniform(0.5, 4), 0))
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")
    image = np.clip(image, 0, 255)
    if image.ndim == 2 and rng.random() < 0.3:
        return (image * 257).astype(np.uint16)
    return image.astype(np.uint8)


def crop(image: np.ndarray, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A random window of ``image`` (at most ``size`` per side, the whole axis when smaller)."""
    h, w = image.shape[:2]
    ch, cw = min(h, size), min(w, size)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[y : y + ch, x : x + cw]


def unknown_sample(image: np.ndarray, source: str) -> Sample:
    """A `Sample` of an image unlike microscopy: no objects, ``meta["unknown"]``."""
    return Sample(image=image, labels=np.zeros(image.shape[:2], np.int32), categories={}, style="unknown",
                  meta={"unknown": True, "source": source})


def training_unknown(rng: np.random.Generator, size: int = 256) -> Sample:
    """Noise (half) or a window of a training photograph (half), of any size from ``size / 2`` to ``3 size``:
    the model sees every image at one resolution, so noise drawn at one size would look smooth or grainy
    only at that size."""
    side = int(np.exp(rng.uniform(np.log(size // 2), np.log(3 * size))))
    if rng.random() < 0.5:
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        return unknown_sample(noise(kind, rng, (side, int(side * rng.uniform(0.75, 1.33)))), f"noise:{kind}")
    name = TRAINING_PHOTOS[int(rng.integers(len(TRAINING_PHOTOS)))]
    image = crop(photo(name), rng, side)
    return unknown_sample(image, f"photo:{name}")
