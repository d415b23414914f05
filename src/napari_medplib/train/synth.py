"""Synthetic microscopy images with instance masks, so a small model can be trained and tested offline.

No model hub or real data set is reachable, so the default model learns from images drawn here. Each
style mimics what a microscopist sees and what makes segmentation hard: touching objects (split along
the line where two blobs meet, as watershed-like ground truth does), varied size/shape/texture, optical
blur, Poisson + Gaussian noise, uneven background, and 8- or 16-bit camera values (the 16-bit ones use
a small part of the range with an offset, as real cameras do, to exercise the contrast pipeline).

Styles (category names in brackets):

* ``nuclei`` — fluorescence nuclei (``nucleus``), one channel;
* ``cells`` — fluorescence cells (``cytoplasm``, ``nucleus``): two channels (nuclear + cytoplasm
  stain) by default, or one channel where both stains are merged;
* ``organelles`` — mitochondria-like curvy tubes (``mitochondrion``), one channel;
* ``brightfield`` — dark-edged cells on a bright background (``cell``), one channel;
* ``he`` — H&E-like histology: pink stroma, purple nuclei, white lumina (``nucleus``, ``lumen``), RGB;
* ``bacteria`` — phase-contrast rod-shaped bacteria in packed micro-colonies (``bacterium``): dark rods
  with a bright halo and bright seams between touching rods, one channel. Not in `DEFAULT_STYLES`
  (added after the first models; data sets that do not name it are unchanged).
* ``em_neurites`` — transmission EM of neuropil (``neurite``): a tessellation of pale, grainy profiles
  separated by dark membranes, with dark mitochondria and vesicles inside, one channel (like serial-section
  TEM of nervous tissue);
* ``em_axons`` — EM of myelinated axons in cross-section (``axon``): pale axoplasm ringed by a thick dark
  myelin sheath, packed in a grey, textured background, one channel (like SEM/TEM of nerve or spinal cord).
  Both EM styles are opted into like ``bacteria``.

Labels are int32 instance ids 1..N (0 = background), every instance one connected piece of at least
``MIN_AREA`` pixels; ``categories`` maps each id to its category. numpy + scipy only, ~10-30 ms/sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .datatypes import Sample, SyntheticSample

__all__ = ["ALL_CATEGORIES", "DEFAULT_STYLES", "STYLES", "Sample", "StyleInfo", "SyntheticSample", "make_dataset",
           "make_sample", "sample_seed"]

#: Smallest instance kept, in pixels: smaller fragments are unlearnable and vanish in the 24x24 grid.
MIN_AREA = 12


@dataclass(frozen=True)
class StyleInfo:
    """What a style is called in image-level answers, and its categories."""

    modality: str
    description: str
    categories: tuple[str, ...]
    default_channels: int
    #: Area thresholds (pixels) between small/medium and medium/large per category: the terciles of
    #: areas over 300-400 generated 256x256 samples (measured, rounded). Objects keep their pixel size
    #: whatever the image size, so the thresholds do not scale with it.
    size_thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Categories really there though not annotated (nuclei lie in cells): never asked as "is there
    #: a ...?" negatives, so no answer says "no cell" about an image of nuclei.
    implied: tuple[str, ...] = ()


STYLES: dict[str, StyleInfo] = {
    "nuclei": StyleInfo(
        "fluorescence microscopy", "fluorescence microscopy of nuclei", ("nucleus",), 1,
        {"nucleus": (195.0, 300.0)}, implied=("cell", "cytoplasm"),
    ),
    "cells": StyleInfo(
        "fluorescence microscopy", "fluorescence microscopy of cells", ("cytoplasm", "nucleus"), 2,
        {"cytoplasm": (550.0, 790.0), "nucleus": (160.0, 245.0)}, implied=("cell",),
    ),
    "organelles": StyleInfo(
        "fluorescence microscopy", "fluorescence microscopy of mitochondria", ("mitochondrion",), 1,
        {"mitochondrion": (48.0, 105.0)}, implied=("cell", "cytoplasm"),
    ),
    "brightfield": StyleInfo(
        "brightfield microscopy", "brightfield microscopy of cells", ("cell",), 1,
        {"cell": (420.0, 640.0)}, implied=("cytoplasm", "nucleus"),
    ),
    "he": StyleInfo(
        "H&E histology", "H&E-stained tissue section", ("nucleus", "lumen"), 3,
        {"nucleus": (36.0, 56.0), "lumen": (1550.0, 2350.0)}, implied=("cell", "cytoplasm"),
    ),
    "bacteria": StyleInfo(
        "phase-contrast microscopy", "phase-contrast microscopy of bacteria", ("bacterium",), 1,
        {"bacterium": (275.0, 535.0)}, implied=("cell",),
    ),
    "em_neurites": StyleInfo(
        "electron microscopy", "electron microscopy of neurites", ("neurite",), 1,
        {"neurite": (250.0, 700.0)}, implied=("mitochondrion",),
    ),
    "em_axons": StyleInfo(
        "electron microscopy", "electron microscopy of myelinated axons", ("axon",), 1,
        {"axon": (120.0, 400.0)}, implied=("cell",),
    ),
    "ihc": StyleInfo(
        "immunohistochemistry (DAB, brightfield)", "immunohistochemistry (DAB) of tissue with nuclei", ("nucleus",), 3,
        {"nucleus": (72.0, 97.0)}, implied=("cell", "cytoplasm"),
    ),
}

#: The styles a data set has when it names none: the first five. ``bacteria`` came later and is opted
#: into (``styles`` of `make_dataset`, a recipe's ``[data]`` or stage ``styles``), so every data set
#: made before it, and every recipe stage trained on one, stays the same.
DEFAULT_STYLES: tuple[str, ...] = ("nuclei", "cells", "organelles", "brightfield", "he")

#: The default styles' categories: the vocabulary for "is there a ... ?" negatives (`vocabulary_for`
#: adds those of opted-in styles).
ALL_CATEGORIES: tuple[str, ...] = tuple(sorted({c for s in DEFAULT_STYLES for c in STYLES[s].categories}))


def vocabulary_for(styles: Sequence[str]) -> tuple[str, ...]:
    """Categories a data set of `styles` may ask about: `ALL_CATEGORIES` plus the styles' own."""
    return tuple(sorted({*ALL_CATEGORIES, *(c for s in styles for c in STYLES[s].categories)}))


# ----------------------------------------------------------------------------- shapes and placement
@dataclass
class _Blob:
    cy: float
    cx: float
    a: float  # semi-axis along `angle`
    b: float
    angle: float
    harmonics: np.ndarray  # (K, 3): order, amplitude, phase of the boundary wobble

    @property
    def radius(self) -> float:
        return float(np.sqrt(self.a * self.b))


def _random_blob(rng: np.random.Generator, cy: float, cx: float, r: float, max_aspect: float,
                 roughness: float) -> _Blob:
    aspect = float(np.exp(rng.uniform(0.0, np.log(max_aspect))))  # log-uniform: round and elongated
    orders = np.arange(2, 5, dtype=float)
    amps = roughness * rng.standard_normal(3) / orders
    phases = rng.uniform(0, 2 * np.pi, 3)
    return _Blob(cy, cx, r * np.sqrt(aspect), r / np.sqrt(aspect), rng.uniform(0, np.pi),
                 np.stack([orders, amps, phases], axis=1))


def _blob_distance(blob: _Blob, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Normalised distance (< 1 inside) of a wobbly ellipse on its bounding patch of the image."""
    reach = max(blob.a, blob.b) * (1.0 + np.abs(blob.harmonics[:, 1]).sum()) + 1.0
    y0, y1 = max(int(blob.cy - reach), 0), min(int(blob.cy + reach) + 2, shape[0])
    x0, x1 = max(int(blob.cx - reach), 0), min(int(blob.cx + reach) + 2, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - blob.cy, xx - blob.cx
    c, s = np.cos(blob.angle), np.sin(blob.angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in blob.harmonics)
    dist = np.sqrt((u / blob.a) ** 2 + (v / blob.b) ** 2) / np.maximum(wobble, 0.3)
    return (slice(y0, y1), slice(x0, x1)), dist


def _paint_blobs(blobs: Sequence[_Blob], shape: tuple[int, int], first_id: int = 1,
                 labels: np.ndarray | None = None, within: np.ndarray | None = None) -> np.ndarray:
    """Rasterise blobs; where two overlap, each pixel goes to the blob it is deeper inside.

    That splits overlapping blobs along a smooth line, so touching objects share a border, as in
    hand-made or watershed ground truth. `within` (a label image) confines blob i to within == its id.
    """
    labels = np.zeros(shape, np.int32) if labels is None else labels
    best = np.full(shape, np.inf, np.float32)
    for k, blob in enumerate(blobs):
        got = _blob_distance(blob, shape)
        if got is None:
            continue
        sl, dist = got
        take = (dist < 1.0) & (dist < best[sl])
        if within is not None:
            take &= within[sl] == k + 1
        best[sl][take] = dist[take]
        labels[sl][take] = first_id + k
    return labels


def _place(rng: np.random.Generator, shape: tuple[int, int], radii: np.ndarray, p_touch: float,
           margin: float = 0.0) -> list[tuple[float, float]]:
    """Centres for objects of given radii: some touching a placed neighbour, the rest spread out.

    Object 1 always touches object 0, so every image has at least one touching pair.
    """
    centres: list[tuple[float, float]] = []
    for i, r in enumerate(radii):
        for _ in range(30):
            if centres and (i == 1 or rng.random() < p_touch):
                j = 0 if i == 1 else int(rng.integers(len(centres)))
                d = (r + radii[j]) * rng.uniform(0.8, 0.95)
                ang = rng.uniform(0, 2 * np.pi)
                cy, cx = centres[j][0] + d * np.sin(ang), centres[j][1] + d * np.cos(ang)
                min_gap = 0.7
            else:
                cy = rng.uniform(margin, shape[0] - margin)
                cx = rng.uniform(margin, shape[1] - margin)
                min_gap = 1.05
            if not (0 <= cy < shape[0] and 0 <= cx < shape[1]):
                continue
            if all(np.hypot(cy - py, cx - px) >= min_gap * (r + radii[k])
                   for k, (py, px) in enumerate(centres) if py == py):
                centres.append((cy, cx))
                break
        else:
            centres.append((float("nan"), float("nan")))  # no room: the object is dropped
    return centres


def _finalise(labels: np.ndarray, category_of: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """Keep each instance's largest connected piece if >= MIN_AREA; renumber 1..N in id order."""
    out = np.zeros_like(labels)
    categories: dict[int, str] = {}
    for old, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        piece = labels[sl] == old
        comp, n = ndi.label(piece)
        if n > 1:
            piece = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
        if piece.sum() < MIN_AREA:
            continue
        new = len(categories) + 1
        out[sl][piece] = new
        categories[new] = category_of[old]
    return out, categories


# ----------------------------------------------------------------------------- fields and camera
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 5) -> np.ndarray:
    """Slowly varying field in [0, 1]: uneven illumination / background."""
    coarse = rng.random((cells, cells))
    field_ = ndi.zoom(coarse, (shape[0] / cells, shape[1] / cells), order=1, mode="nearest")
    field_ = field_[: shape[0], : shape[1]]
    lo, hi = field_.min(), field_.max()
    return ((field_ - lo) / (hi - lo + 1e-9)).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise: chromatin / cytoplasm / stroma texture."""
    tex = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return tex / (tex.std() + 1e-9)


def _fluorescence_camera(rng: np.random.Generator, signal: np.ndarray, bit_depth: int) -> np.ndarray:
    """Photon counts (Poisson) + read noise (Gaussian) + offset, clipped to the bit depth."""
    if bit_depth == 8:
        peak, offset, read = rng.uniform(70, 190), rng.uniform(0, 12), rng.uniform(1, 4)
    else:
        peak, offset, read = rng.uniform(400, 20000), 100.0, rng.uniform(2, 10)
    counts = rng.poisson(np.clip(signal, 0, None) * peak).astype(np.float32)
    counts += offset + read * rng.standard_normal(signal.shape).astype(np.float32)
    return _to_dtype(counts, bit_depth)


def _transmitted_camera(rng: np.random.Generator, intensity: np.ndarray, bit_depth: int) -> np.ndarray:
    """Transmitted light in [0, 1] -> camera values; shot noise of a bright field (~1-3 %)."""
    photons = rng.uniform(1500, 8000)
    noisy = rng.poisson(np.clip(intensity, 0, None) * photons).astype(np.float32) / photons
    noisy += rng.uniform(0.003, 0.01) * rng.standard_normal(intensity.shape).astype(np.float32)
    white = rng.uniform(215, 250) if bit_depth == 8 else rng.uniform(3000, 60000)
    return _to_dtype(noisy * white, bit_depth)


def _to_dtype(values: np.ndarray, bit_depth: int) -> np.ndarray:
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.clip(np.rint(values), 0, np.iinfo(dtype).max).astype(dtype)


def _blur(rng: np.random.Generator, signal: np.ndarray, lo: float, hi: float) -> np.ndarray:
    sigma = rng.uniform(lo, hi)
    sig = (sigma, sigma) + (0,) * (signal.ndim - 2)
    return ndi.gaussian_filter(signal, sig)


def _count(rng: np.random.Generator, shape: tuple[int, int], lo: int, hi: int) -> int:
    """Object count scaled by image area (object size is fixed in pixels)."""
    scale = shape[0] * shape[1] / 256.0**2
    return max(2, int(round(rng.integers(lo, hi + 1) * scale)))  # noqa: RUF046 (a numpy float)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of an instance that have a 4-neighbour with another value (inner boundary)."""
    edge = np.zeros(labels.shape, bool)
    diff_v = labels[1:] != labels[:-1]
    diff_h = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge & (labels > 0)


def _touching(labels: np.ndarray) -> np.ndarray:
    """Pixels of an instance with a 4-neighbour in another instance (not background)."""
    out = np.zeros(labels.shape, bool)
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        meet = (a != b) & (a > 0) & (b > 0)
        if a.shape[0] != labels.shape[0]:
            out[1:] |= meet
            out[:-1] |= meet
        else:
            out[:, 1:] |= meet
            out[:, :-1] |= meet
    return out


# ----------------------------------------------------------------------------- styles
def _nuclei(rng, shape):
    n = _count(rng, shape, 8, 30)
    r0 = rng.uniform(6.5, 12.0)
    radii = r0 * rng.lognormal(0, 0.18, n)
    centres = _place(rng, shape, radii, p_touch=0.45)
    blobs = [_random_blob(rng, cy, cx, r, 2.6, rng.uniform(0.02, 0.15))
             for (cy, cx), r in zip(centres, radii, strict=True) if cy == cy]
    labels, cats = _finalise(_paint_blobs(blobs, shape), dict.fromkeys(range(1, len(blobs) + 1), "nucleus"))
    bright = np.concatenate([[0.0], rng.lognormal(0, 0.35, len(cats))]).astype(np.float32)
    signal = bright[labels] * (1 + rng.uniform(0.1, 0.3) * _texture(rng, shape, rng.uniform(0.8, 2.0)))
    signal += rng.uniform(0.02, 0.15) * _smooth_field(rng, shape)
    return _blur(rng, signal, 0.6, 1.8), labels, cats, "fluorescence"


def _cells(rng, shape, channels):
    n = _count(rng, shape, 4, 11)
    r0 = rng.uniform(14.0, 21.0)
    radii = r0 * rng.lognormal(0, 0.15, n)
    centres = _place(rng, shape, radii, p_touch=0.55)
    keep = [i for i, c in enumerate(centres) if c[0] == c[0]]
    cells = [_random_blob(rng, *centres[i], radii[i], 2.0, rng.uniform(0.05, 0.2)) for i in keep]
    cell_labels = _paint_blobs(cells, shape)
    nuclei = []
    for c in cells:
        off = rng.uniform(0, 0.2) * c.radius
        ang = rng.uniform(0, 2 * np.pi)
        nuclei.append(_random_blob(rng, c.cy + off * np.sin(ang), c.cx + off * np.cos(ang),
                                   c.radius * rng.uniform(0.38, 0.55), 1.8, 0.05))
    k = len(cells)
    # nucleus of cell i gets id k + i, confined to that cell
    labels = _paint_blobs(nuclei, shape, first_id=k + 1, labels=cell_labels.copy(), within=cell_labels)
    kinds = dict.fromkeys(range(1, k + 1), "cytoplasm") | {k + i: "nucleus" for i in range(1, k + 1)}
    labels, cats = _finalise(labels, kinds)
    ids = np.arange(len(cats) + 1)
    is_nuc = np.array([False] + [cats[i] == "nucleus" for i in ids[1:]])
    level = np.concatenate([[0.0], rng.lognormal(0, 0.35, len(cats))]).astype(np.float32)
    dna = np.where(is_nuc, level, 0.03)[labels]
    cyto = np.where(is_nuc, 0.15, level * 0.8)[labels] * (labels > 0)
    tex = _texture(rng, shape, rng.uniform(1.0, 2.5))
    dna = dna * (1 + 0.2 * tex)
    cyto = cyto * (1 + 0.3 * tex)
    bg = rng.uniform(0.02, 0.12) * _smooth_field(rng, shape)
    if channels == 1:
        signal = dna + 0.35 * cyto + bg
    else:
        signal = np.stack([dna + bg, cyto + bg] + [bg] * (channels - 2), axis=-1)
    return _blur(rng, signal, 0.6, 1.6), labels, cats, "fluorescence"


def _tube_mask(rng: np.random.Generator, shape: tuple[int, int]):
    """A curvy tube: a smooth random walk thickened by a radius, on its bounding patch."""
    short = rng.random() < 0.25  # some fragmented, punctate mitochondria
    length, width = rng.uniform(1, 6) if short else rng.uniform(8, 40), rng.uniform(1.3, 2.6)
    n = max(int(length / 0.7), 2)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.12, n))
    ys = rng.uniform(0, shape[0]) + np.cumsum(0.7 * np.sin(heading))
    xs = rng.uniform(0, shape[1]) + np.cumsum(0.7 * np.cos(heading))
    pad = int(width) + 2
    y0, x0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
    y1, x1 = min(int(ys.max()) + pad + 1, shape[0]), min(int(xs.max()) + pad + 1, shape[1])
    if y1 - y0 < 2 or x1 - x0 < 2:
        return None
    spine = np.ones((y1 - y0, x1 - x0), bool)
    iy, ix = np.rint(ys).astype(int) - y0, np.rint(xs).astype(int) - x0
    ok = (iy >= 0) & (iy < spine.shape[0]) & (ix >= 0) & (ix < spine.shape[1])
    if not ok.any():
        return None
    spine[iy[ok], ix[ok]] = False
    return (slice(y0, y1), slice(x0, x1)), ndi.distance_transform_edt(spine) <= width


def _organelles(rng, shape):
    n = _count(rng, shape, 8, 24)
    labels = np.zeros(shape, np.int32)
    placed = 0
    for _ in range(4 * n):
        if placed == n:
            break
        got = _tube_mask(rng, shape)
        if got is None:
            continue
        sl, tube = got
        grown = ndi.binary_dilation(tube)  # keep a 1-px gap: separate tubes stay separate
        if (labels[sl][grown] > 0).any():
            continue
        placed += 1
        labels[sl][tube] = placed
    labels, cats = _finalise(labels, dict.fromkeys(range(1, placed + 1), "mitochondrion"))
    bright = np.concatenate([[0.0], rng.lognormal(0, 0.35, len(cats))]).astype(np.float32)
    signal = bright[labels] * (1 + 0.2 * _texture(rng, shape, 1.0))
    haze = _smooth_field(rng, shape, cells=3) ** 2  # diffuse cytoplasmic background
    signal += rng.uniform(0.05, 0.2) * haze + 0.02
    return _blur(rng, signal, 0.5, 1.2), labels, cats, "fluorescence"


def _brightfield(rng, shape):
    n = _count(rng, shape, 5, 13)
    r0 = rng.uniform(10.0, 17.0)
    radii = r0 * rng.lognormal(0, 0.18, n)
    centres = _place(rng, shape, radii, p_touch=0.45)
    blobs = [_random_blob(rng, cy, cx, r, 2.4, rng.uniform(0.03, 0.15))
             for (cy, cx), r in zip(centres, radii, strict=True) if cy == cy]
    labels, cats = _finalise(_paint_blobs(blobs, shape), dict.fromkeys(range(1, len(blobs) + 1), "cell"))
    inside = np.concatenate([[1.0], rng.uniform(0.6, 1.15, len(cats))]).astype(np.float32)
    light = 0.78 + 0.12 * _smooth_field(rng, shape)
    body = inside[labels] * (1 + 0.05 * _texture(rng, shape, 1.5))
    edge = np.clip(2.0 * ndi.gaussian_filter(_boundaries(labels).astype(np.float32), 0.8), 0, 1)
    intensity = light * body * (1 - rng.uniform(0.45, 0.7) * edge)
    return _blur(rng, intensity, 0.5, 1.0), labels, cats, "transmitted"


_H_STAIN = np.array([0.65, 0.70, 0.29], np.float32)  # hematoxylin optical density per RGB
_E_STAIN = np.array([0.07, 0.99, 0.11], np.float32)  # eosin


def _he(rng, shape):
    n_lumen = int(rng.integers(0, 3))
    lr = rng.uniform(18, 34, n_lumen)
    lc = _place(rng, shape, lr, p_touch=0.0, margin=10)
    lumina = [_random_blob(rng, cy, cx, r, 1.8, 0.12) for (cy, cx), r in zip(lc, lr, strict=True) if cy == cy]
    labels = _paint_blobs(lumina, shape)
    k = len(lumina)
    n = _count(rng, shape, 25, 60)
    nuclei = []
    for _ in range(n):
        r = rng.uniform(2.8, 5.2)
        if lumina and rng.random() < 0.5:  # epithelium: nuclei line the lumen
            lum = lumina[int(rng.integers(k))]
            ang = rng.uniform(0, 2 * np.pi)
            d = lum.radius + r * rng.uniform(1.2, 2.2)
            cy, cx = lum.cy + d * np.sin(ang), lum.cx + d * np.cos(ang)
        else:
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        nuclei.append(_random_blob(rng, cy, cx, r, 2.8, 0.08))
    nuc = _paint_blobs(nuclei, shape, first_id=k + 1)
    labels = np.where((labels == 0) & (nuc > 0), nuc, labels)
    kinds = dict.fromkeys(range(1, k + 1), "lumen") | {k + i: "nucleus" for i in range(1, n + 1)}
    labels, cats = _finalise(labels, kinds)
    is_nuc = np.array([False] + [cats[i] == "nucleus" for i in range(1, len(cats) + 1)])
    is_lum = np.array([False] + [cats[i] == "lumen" for i in range(1, len(cats) + 1)])
    hema = np.where(is_nuc, np.concatenate([[0.0], rng.uniform(0.7, 1.6, len(cats))]), 0.05)[labels]
    along = (1.0, 4.0) if rng.random() < 0.5 else (4.0, 1.0)  # fibre direction
    fibres = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), along)
    fibres /= fibres.std() + 1e-9
    eosin = np.where(is_lum[labels], 0.02, rng.uniform(0.35, 0.6) * (1 + 0.35 * fibres))
    eosin = np.where(is_nuc[labels], 0.25, eosin).astype(np.float32)
    hema = hema * (1 + 0.2 * _texture(rng, shape, 0.8))
    od = hema[..., None] * _H_STAIN + np.clip(eosin, 0, None)[..., None] * _E_STAIN
    rgb = np.exp(-od) * (0.92 + 0.06 * _smooth_field(rng, shape)[..., None])
    return _blur(rng, rgb.astype(np.float32), 0.4, 0.9), labels, cats, "transmitted"


_DAB_STAIN = np.array([0.27, 0.57, 0.78], np.float32)  # DAB (brown) optical density per RGB


def _ihc(rng, shape):
    """Immunohistochemistry with a haematoxylin counterstain: nuclei blue, a share of them brown (DAB-positive
    nuclear markers such as Ki67), a faint stroma; no eosin."""
    n = _count(rng, shape, 30, 80)
    centres = _place(rng, shape, np.full(n, 5.0), p_touch=0.25, margin=2)
    nuclei = [_random_blob(rng, cy, cx, rng.uniform(4.0, 6.5), 1.8, 0.1) for cy, cx in centres if cy == cy]
    labels = _paint_blobs(nuclei, shape)
    labels, cats = _finalise(labels, dict.fromkeys(range(1, len(nuclei) + 1), "nucleus"))
    count = len(cats)
    positive = rng.random(count + 1) < rng.uniform(0.1, 0.7)
    positive[0] = False
    dab = np.where(positive, rng.uniform(0.6, 1.4, count + 1), 0.0)[labels]
    hema = np.where(labels > 0, np.concatenate([[0.0], rng.uniform(0.5, 1.1, count)])[labels], 0.0)
    hema = np.where(positive[labels], 0.3 * hema, hema) * (1 + 0.2 * _texture(rng, shape, 0.8))
    stroma = rng.uniform(0.04, 0.15) * (1 + 0.4 * _smooth_field(rng, shape))
    od = hema[..., None] * _H_STAIN + dab[..., None] * _DAB_STAIN + stroma[..., None] * _H_STAIN
    rgb = np.exp(-od) * (0.92 + 0.06 * _smooth_field(rng, shape)[..., None])
    return _blur(rng, rgb.astype(np.float32), 0.4, 0.9), labels, cats, "transmitted"


def _capsule_distance(cy: float, cx: float, half_length: float, radius: float, angle: float,
                      shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Normalised distance (< 1 inside) of a rod (a segment thickened by `radius`) on its patch."""
    reach = half_length + radius + 1.0
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, shape[0])
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    along = np.clip(dx * np.cos(angle) + dy * np.sin(angle), -half_length, half_length)
    dist = np.hypot(dx - along * np.cos(angle), dy - along * np.sin(angle)) / radius
    return (slice(y0, y1), slice(x0, x1)), dist


def _colony(rng: np.random.Generator, shape: tuple[int, int], labels: np.ndarray, best: np.ndarray,
            n: int, radius: float, first_id: int) -> int:
    """Grow a micro-colony of up to `n` rods: each new rod lies beside or beyond a placed one, nearly
    parallel to it (sister cells after division), touching; returns how many were placed."""
    rods: list[tuple[float, float, float, float]] = []  # cy, cx, half_length, angle
    placed = 0
    for _ in range(6 * n):
        if placed == n:
            break
        half = radius * rng.uniform(1.3, 4.5)  # rods 2.3-5.5 widths long (E. coli: 2-5 um x 1 um)
        if not rods:
            cy, cx = rng.uniform(0.15, 0.85) * shape[0], rng.uniform(0.15, 0.85) * shape[1]
            angle = rng.uniform(0, np.pi)
        else:
            py, px, phalf, pangle = rods[int(rng.integers(len(rods)))]
            angle = pangle + rng.normal(0, 0.25)
            ux, uy = np.cos(pangle), np.sin(pangle)
            if rng.random() < 0.6:  # side by side
                side = rng.choice([-1.0, 1.0]) * 2.0 * radius * rng.uniform(0.9, 1.0)
                shift = rng.uniform(-0.6, 0.6) * phalf
                cy, cx = py + side * ux + shift * uy, px - side * uy + shift * ux
            else:  # end to end
                step = rng.choice([-1.0, 1.0]) * (phalf + half + 2.0 * radius) * rng.uniform(0.95, 1.02)
                cy, cx = py + step * uy, px + step * ux
        got = _capsule_distance(cy, cx, half, radius, angle, shape)
        if got is None:
            continue
        sl, dist = got
        inside = dist < 1.0
        if inside.sum() < MIN_AREA or (labels[sl][inside] > 0).mean() > 0.12:
            continue  # off the image, or lying on a placed rod
        take = inside & (dist < best[sl])
        best[sl][take] = dist[take]
        labels[sl][take] = first_id + placed
        rods.append((cy, cx, half, angle))
        placed += 1
    return placed


def _bacteria(rng, shape):
    radius = rng.uniform(3.5, 11.0)  # rod half-width: 7-22 px wide rods
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    total = 0
    budget = _count(rng, shape, 8, 40) * (6.0 / radius) ** 2  # fewer of the big ones
    for _ in range(int(rng.integers(1, 3))):
        total += _colony(rng, shape, labels, best, max(int(budget * rng.uniform(0.4, 0.8)), 2), radius, total + 1)
    for _ in range(int(rng.integers(0, 4))):  # a few lone cells
        total += _colony(rng, shape, labels, best, 1, radius, total + 1)
    labels, cats = _finalise(labels, dict.fromkeys(range(1, total + 1), "bacterium"))
    rods = (labels > 0).astype(np.float32)
    darkness = np.concatenate([[0.0], rng.uniform(0.45, 0.75, len(cats))]).astype(np.float32)
    # phase contrast: dark bodies, a bright halo outside them and bright seams where two rods touch
    halo = np.clip(ndi.gaussian_filter(rods, radius * rng.uniform(0.3, 0.6)) - rods, 0, None)
    seams = ndi.gaussian_filter(_touching(labels).astype(np.float32), 0.7)
    light = 0.55 + 0.1 * _smooth_field(rng, shape) + 0.015 * _texture(rng, shape, 3.0)
    intensity = light * (1 - darkness[labels] * (1 + 0.08 * _texture(rng, shape, 1.5)))
    intensity += light * (rng.uniform(0.8, 2.0) * halo + rng.uniform(0.3, 0.8) * np.clip(seams, 0, 1))
    return _blur(rng, intensity, 0.6, 1.4), labels, cats, "transmitted"


def _em_camera(rng: np.random.Generator, intensity: np.ndarray) -> np.ndarray:
    """EM detector: grain (Gaussian + a little shot noise) on an intensity in [0, 1]."""
    grain = rng.uniform(0.03, 0.09) * _texture(rng, intensity.shape, rng.uniform(0.5, 1.0))
    return np.clip(intensity + grain, 0.0, 1.0)


def _em_neurites(rng, shape):
    """Neuropil: a Voronoi-like tessellation (watershed of random seeds on a noisy field) whose walls are
    dark membranes; the profiles (neurites) are the instances."""
    from skimage.segmentation import watershed

    n = _count(rng, shape, 25, 90)
    seeds = np.zeros(shape, np.int32)
    seeds[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = np.arange(1, n + 1)
    relief = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), rng.uniform(4, 10))
    relief *= rng.uniform(0.0, 12.0) / (relief.std() + 1e-9)
    cells = watershed(ndi.distance_transform_edt(seeds == 0) + relief, seeds)  # Voronoi with wavy walls
    small = np.flatnonzero(np.bincount(cells.ravel(), minlength=n + 1)[1:] < 60) + 1
    if small.size:  # slivers squeezed between neighbours: flood again without their seeds
        seeds[np.isin(seeds, small)] = 0
        cells = watershed(ndi.distance_transform_edt(seeds == 0) + relief, seeds)
    membrane = _boundaries(cells)
    if rng.random() < 0.5:  # thicker membranes (iterations=0 would dilate until nothing changes)
        membrane = ndi.binary_dilation(membrane)
    labels = np.where(membrane, 0, cells).astype(np.int32)
    labels, cats = _finalise(labels, dict.fromkeys(range(1, n + 1), "neurite"))
    shade = np.concatenate([[0.0], rng.uniform(0.55, 0.85, len(cats))]).astype(np.float32)
    intensity = shade[labels] * (1 + 0.06 * _texture(rng, shape, 1.2))
    intensity[membrane] = rng.uniform(0.05, 0.3)
    for _ in range(int(rng.integers(0, 8))):  # mitochondria: dark, elongated, inside a profile
        blob = _random_blob(rng, rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(3, 8), 3.0, 0.1)
        found = _blob_distance(blob, shape)
        if found is not None:
            sl, dist = found
            intensity[sl][dist < 1] *= rng.uniform(0.3, 0.6)
    dots = rng.random(shape) < rng.uniform(0.0, 0.004)  # vesicles
    intensity[ndi.binary_dilation(dots)] *= 0.6
    intensity = _blur(rng, intensity, 0.4, 1.0)
    return _em_camera(rng, intensity), labels, cats, "em"


def _em_axons(rng, shape):
    """Myelinated axons in cross-section: pale discs (the instances) in thick dark rings, packed."""
    n = _count(rng, shape, 6, 30)
    r0 = rng.uniform(5.0, 16.0)
    radii = r0 * rng.lognormal(0, 0.35, n)
    sheath = rng.uniform(0.25, 0.6)  # myelin thickness relative to the axon radius
    centres = _place(rng, shape, radii * (1 + sheath), p_touch=0.6)
    axons = [_random_blob(rng, cy, cx, r, 1.8, rng.uniform(0.02, 0.12))
             for (cy, cx), r in zip(centres, radii, strict=True) if cy == cy]
    rings = [_Blob(b.cy, b.cx, b.a * (1 + sheath), b.b * (1 + sheath), b.angle, b.harmonics) for b in axons]
    myelin = _paint_blobs(rings, shape) > 0
    labels, cats = _finalise(_paint_blobs(axons, shape), dict.fromkeys(range(1, len(axons) + 1), "axon"))
    background = rng.uniform(0.35, 0.6) * (1 + 0.15 * _texture(rng, shape, rng.uniform(1.0, 3.0)))
    inside = np.concatenate([[0.0], rng.uniform(0.65, 0.95, len(cats))]).astype(np.float32)
    intensity = np.where(myelin, rng.uniform(0.03, 0.2), background).astype(np.float32)
    intensity = np.where(labels > 0, inside[labels] * (1 + 0.05 * _texture(rng, shape, 1.5)), intensity)
    if rng.random() < 0.3:  # some preparations show myelin bright and axoplasm dark (inverted contrast)
        intensity = 1.0 - intensity
    intensity = _blur(rng, intensity, 0.4, 1.0)
    return _em_camera(rng, intensity), labels, cats, "em"


# ----------------------------------------------------------------------------- public API
def make_sample(style: str, seed: int | Sequence[int], size: tuple[int, int] = (256, 256),
                bit_depth: int = 8, channels: int | None = None) -> Sample:
    """Draw one synthetic image of `style`; the same arguments always give identical arrays.

    `channels` only matters for ``cells`` (1 merged or 2+ stains); ``he`` is always RGB.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    shape = (int(size[0]), int(size[1]))
    if min(shape) < 32:
        raise ValueError(f"size must be at least 32x32 pixels, got {size!r}")
    info = STYLES[style]
    ch = info.default_channels if channels is None else int(channels)
    if style == "cells" and not 1 <= ch <= 4:
        raise ValueError(f"cells take 1 to 4 channels, got {channels!r}")
    if style != "cells" and channels is not None and ch != info.default_channels:
        raise ValueError(f"style {style!r} has {info.default_channels} channel(s), got {channels!r}")
    rng = np.random.default_rng(seed)
    if style == "cells":
        signal, labels, cats, optics = _cells(rng, shape, ch)
    else:
        signal, labels, cats, optics = {"nuclei": _nuclei, "organelles": _organelles, "brightfield": _brightfield,
                                        "he": _he, "bacteria": _bacteria, "em_neurites": _em_neurites,
                                        "em_axons": _em_axons, "ihc": _ihc}[style](rng, shape)
    if optics == "em":  # the signal is already detector grey levels in [0, 1]
        image = _to_dtype(signal * (255.0 if bit_depth == 8 else rng.uniform(4000, 60000)), bit_depth)
    else:
        camera = _fluorescence_camera if optics == "fluorescence" else _transmitted_camera
        image = camera(rng, signal, bit_depth)
    meta = {
        "seed": int(seed) if np.ndim(seed) == 0 else [int(v) for v in seed],  # type: ignore[union-attr]
        "bit_depth": bit_depth,
        "channels": ch,
        "modality": info.modality,
        "description": info.description,
        "size_thresholds": {c: list(t) for c, t in info.size_thresholds.items()},
        "implied": list(info.implied),
    }
    return Sample(image, labels.astype(np.int32), cats, style, meta)


SPLITS = ("train", "heldout")


def sample_seed(seed: int, index: int, split: str = "train") -> int:
    """The seed of sample `index` of a data set: train seeds are even, held-out seeds odd.

    ``2 * (seed * 2**32 + index) + (split == "heldout")`` — so the two splits can never share a
    sample for any `seed` and any index below 2**32, and sample i is reproducible on its own with
    ``make_sample(style, sample_seed(seed, i, split))``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0 or not 0 <= index < 2**32:
        raise ValueError(f"need seed >= 0 and 0 <= index < 2**32, got seed={seed}, index={index}")
    return 2 * (seed * 2**32 + index) + (split == "heldout")


def make_dataset(n: int, seed: int = 0, styles: Sequence[str] = DEFAULT_STYLES, split: str = "train",
                 size: tuple[int, int] = (256, 256), bit_depths: Sequence[int] = (8, 16),
                 start: int = 0) -> Iterator[Sample]:
    """Yield `n` samples, cycling through `styles` in order (balanced); lazily, so any n fits memory.

    Bit depth is drawn per sample from `bit_depths` (``he`` is always 8-bit: 16-bit RGB histology
    is not a thing), and ``cells`` get 1 or 2 channels at random. `start` skips ahead, e.g. to
    resume a partly written data set.
    """
    for style in styles:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    for index in range(start, start + n):
        s = sample_seed(seed, index, split)
        pick = np.random.default_rng([s, 7])  # choices about the sample, apart from its drawing
        style = styles[index % len(styles)]
        bits = 8 if style == "he" else int(pick.choice(bit_depths))
        channels = int(pick.integers(1, 3)) if style == "cells" else None
        sample = make_sample(style, s, size=size, bit_depth=bits, channels=channels)
        sample.meta.update(index=index, split=split, dataset_seed=seed)
        yield sample
