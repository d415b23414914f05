"""The model-free image-kind guess and the example questions it suggests (trained wordings only)."""

import subprocess
import sys
import time

import numpy as np
import pytest

from napari_medplib.suggested_questions import (
    KINDS,
    image_kind,
    is_trained_wording,
    sample_plane,
    suggested_questions,
)

#: The wordings the bundled model was trained on, spelled out here on purpose: a changed constant in the
#: module must fail this test rather than silently teach users a rewording.
TRAINED = {
    "Describe the image in a few words.",
    "What type of imaging is this?",
    "Which stain does this image show?",
    "What is in <region>?",
    *(f"How many {n} are there?" for n in ("nuclei", "cells")),
    *(f"Please segment the {n}." for n in ("nuclei", "cells")),
}


def _discs(shape, n, radius, seed=0):
    """Bool mask of ``n`` random discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for cy, cx in rng.uniform(radius, np.array(shape) - radius, size=(n, 2)):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    return mask


def _noise(shape, sigma, seed=1):
    return np.random.default_rng(seed).normal(0, sigma, shape)


def fluorescence_plane(dtype=np.uint16):
    """Dark background with camera noise and bright nuclei."""
    shape = (300, 400)
    img = 100 + _noise(shape, 5) + 2500 * _discs(shape, 25, 12)
    if dtype == np.uint8:
        img = img / 12
    return np.clip(img, 0, np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else None).astype(dtype)


def transmitted_plane():
    """Brightfield: a bright background with darker cells."""
    shape = (300, 400)
    img = 200 - 90 * _discs(shape, 25, 14) + _noise(shape, 4)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rgb_on_white(colours, shares, seed=0):
    """A white RGB plane with discs of each colour covering about ``share`` of it."""
    shape = (300, 400)
    img = np.full((*shape, 3), (242.0, 240.0, 244.0))
    for k, (colour, share) in enumerate(zip(colours, shares, strict=True)):
        n = max(1, int(share * shape[0] * shape[1] / (np.pi * 15**2)))
        img[_discs(shape, n, 15, seed + k)] = colour
    img += _noise((*shape, 3), 4, seed + 10)
    return np.clip(img, 0, 255).astype(np.uint8)


def he_plane():
    """H&E: pink eosin stroma and purple haematoxylin nuclei on white."""
    return _rgb_on_white([(235, 150, 200), (110, 70, 160)], [0.45, 0.2])


def ihc_plane():
    """IHC: brown DAB and blue haematoxylin counterstain on white."""
    return _rgb_on_white([(150, 100, 55), (90, 100, 170)], [0.25, 0.2])


def test_fluorescence_dark_background_bright_discs():
    assert image_kind(fluorescence_plane(), rgb=False) == "fluorescence"
    assert image_kind(fluorescence_plane(np.uint8), rgb=False) == "fluorescence"
    assert image_kind(fluorescence_plane().astype(np.float32) / 3000, rgb=False) == "fluorescence"


def test_he_pink_and_purple():
    assert image_kind(he_plane(), rgb=True) == "he"


def test_ihc_brown_and_blue():
    assert image_kind(ihc_plane(), rgb=True) == "ihc"


def test_transmitted_bright_or_mid_grey_background():
    assert image_kind(transmitted_plane(), rgb=False) == "transmitted"
    # phase contrast / EM: a mid-grey background with darker and brighter structures
    shape = (300, 400)
    mid = 0.5 + 0.3 * _discs(shape, 20, 10, 3) - 0.3 * _discs(shape, 20, 10, 4) + _noise(shape, 0.02)
    assert image_kind(mid.astype(np.float32), rgb=False) == "transmitted"
    assert image_kind((mid * 40000).astype(np.uint16), rgb=False) == "transmitted"


def test_unknown_for_constant_empty_or_odd_planes():
    assert image_kind(np.zeros((100, 100), np.uint16), rgb=False) == "unknown"
    assert image_kind(np.full((64, 64, 3), 200, np.uint8), rgb=True) == "unknown"
    assert image_kind(np.zeros((0, 0)), rgb=False) == "unknown"
    assert image_kind(np.full((50, 50), np.nan, np.float32), rgb=False) == "unknown"


def test_rgb_variants():
    he = he_plane()
    rgba = np.concatenate([he, np.full((*he.shape[:2], 1), 255, np.uint8)], axis=-1)
    assert image_kind(rgba, rgb=True) == "he"
    assert image_kind(he.astype(np.uint16) * 257, rgb=True) == "he"
    assert image_kind(he.astype(np.float32) / 255, rgb=True) == "he"
    # grey stored as RGB is judged on its brightness
    grey = np.repeat(fluorescence_plane(np.uint8)[..., None], 3, axis=-1)
    assert image_kind(grey, rgb=True) == "fluorescence"
    grey = np.repeat(transmitted_plane()[..., None], 3, axis=-1)
    assert image_kind(grey, rgb=True) == "transmitted"
    # a colour composite of fluorescence channels: dark background
    composite = np.zeros((*fluorescence_plane().shape, 3), np.uint8)
    composite[..., 2] = fluorescence_plane(np.uint8)
    composite[..., 1] = np.roll(fluorescence_plane(np.uint8), 30, axis=1)
    assert image_kind(composite, rgb=True) == "fluorescence"


def test_nan_pixels_are_ignored():
    img = fluorescence_plane().astype(np.float32)
    img[:20] = np.nan
    assert image_kind(img, rgb=False) == "fluorescence"


def test_stacks_are_read_at_their_middle_plane():
    stack = np.zeros((5, *fluorescence_plane().shape), np.uint16)
    stack[2] = fluorescence_plane()
    assert image_kind(stack, rgb=False) == "fluorescence"


class _StridedOnly:
    """An array-like that refuses to be read whole: only strided subsamples of one plane."""

    def __init__(self, shape, fill):
        self.shape, self.dtype, self._fill, self.keys = shape, np.dtype(np.uint8), fill, []

    def __getitem__(self, key):
        self.keys.append(key)
        *_, rows, cols = key
        assert rows.step and rows.step > 1 and cols.step and cols.step > 1, key
        r = np.arange(*rows.indices(self.shape[-2])) % self._fill.shape[0]
        c = np.arange(*cols.indices(self.shape[-1])) % self._fill.shape[1]
        return self._fill[np.ix_(r, c)]  # the sampled pixels of a plane that repeats ``fill``

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array was read")


def test_big_planes_are_subsampled_never_copied():
    # a 20k x 20k plane without 400 MB: a zero-stride view of one row pattern
    row = np.tile(transmitted_plane()[150], 50)[:20_000]
    big = np.broadcast_to(row, (20_000, 20_000))
    start = time.perf_counter()
    image_kind(big, rgb=False)
    assert time.perf_counter() - start < 0.5
    sample = sample_plane(big, rgb=False)
    assert max(sample.shape) <= 512 and sample.base is not big
    guarded = _StridedOnly((3, 20_000, 20_000), fluorescence_plane(np.uint8))
    assert image_kind(guarded, rgb=False) == "fluorescence"
    assert guarded.keys and guarded.keys[0][0] == 1  # the middle plane of the stack


def test_suggested_questions_follow_the_trained_wordings():
    for kind in KINDS:
        questions = suggested_questions(kind)
        assert 2 <= len(questions) <= 3, kind
        assert len(set(questions)) == len(questions)
        for q in questions:
            assert q in TRAINED, (kind, q)
            assert is_trained_wording(q)
    assert suggested_questions("fluorescence")[:2] == ["How many nuclei are there?", "Please segment the nuclei."]
    assert "Which stain does this image show?" in suggested_questions("he")
    assert "Which stain does this image show?" in suggested_questions("ihc")
    assert "Which stain does this image show?" not in suggested_questions("fluorescence")
    assert suggested_questions("transmitted")[:2] == ["How many cells are there?", "Please segment the cells."]
    assert suggested_questions("unknown") == ["Describe the image in a few words.", "What type of imaging is this?"]
    assert suggested_questions("something new") == suggested_questions("unknown")
    assert not is_trained_wording("Count the nuclei for me please.")
    assert not is_trained_wording("Describe this image in a few words.")


def test_import_is_light():
    code = (
        "import sys, napari_medplib.suggested_questions\n"
        "print(','.join(m for m in ('torch', 'qtpy', 'napari', 'PyQt5', 'PyQt6', 'PySide6') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_questions(kind):
    assert suggested_questions(kind)
