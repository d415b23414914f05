"""``engine/scale.py``: model-free object sizes (scale-normalised LoG) on planes of discs of known size."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medplib.engine.scale import (
    MAX_DIAMETER,
    MIN_DIAMETER,
    estimate_object_diameter,
    gray_plane,
    local_object_diameter,
)


def disc_plane(diameter: float, side: int, *, dark: bool = False, seed: int = 0, cover: float = 0.15):
    """A float plane of non-touching discs (bright on dark, or dark on bright) with a little noise,
    and the discs' centres."""
    rng = np.random.default_rng(seed)
    r = diameter / 2
    rows, cols = np.ogrid[:side, :side]
    plane = np.zeros((side, side), np.float32)
    centres: list[tuple[float, float]] = []
    wanted = max(3, int(cover * side * side / (np.pi * r * r)))
    for _ in range(20000):
        if len(centres) == wanted:
            break
        cy, cx = rng.uniform(r + 1, side - r - 1, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 >= (2 * r + 3) ** 2 for y, x in centres):
            centres.append((float(cy), float(cx)))
            plane[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = 1.0
    plane = 0.1 + 0.8 * plane + rng.normal(0, 0.03, plane.shape).astype(np.float32)
    return (1.0 - plane if dark else plane), centres


CASES = [(8, 384), (20, 384), (60, 512), (150, 800)]


@pytest.mark.parametrize("dark", [False, True], ids=["bright-on-dark", "dark-on-bright"])
@pytest.mark.parametrize(("diameter", "side"), CASES)
def test_plane_estimate_is_the_disc_diameter(diameter, side, dark):
    plane, _ = disc_plane(diameter, side, dark=dark, seed=diameter)
    assert estimate_object_diameter(plane) == pytest.approx(diameter, rel=0.25)


def test_plane_estimate_on_a_block_reduced_large_plane():
    plane, _ = disc_plane(40, 1400, seed=1, cover=0.1)
    assert estimate_object_diameter(plane, max_side=512) == pytest.approx(40, rel=0.25)  # 3x reduced first


def test_plane_estimate_tells_small_from_large_objects_in_camera_values():
    small, _ = disc_plane(10, 384, seed=2)
    large, _ = disc_plane(50, 384, seed=2)
    to_camera = lambda p: (p * 3000 + 200).astype(np.uint16)  # noqa: E731 - 16-bit camera values, offset
    a, b = estimate_object_diameter(to_camera(small)), estimate_object_diameter(to_camera(large))
    assert a == pytest.approx(10, rel=0.25) and b == pytest.approx(50, rel=0.25)


@pytest.mark.parametrize("value", [0.0, 1.0, 1234.0])
def test_flat_planes_have_no_objects(value):
    flat = np.full((200, 300), value, np.float32)
    assert estimate_object_diameter(flat) is None
    assert local_object_diameter(flat, (100, 150)) is None  # a flat (saturated, or empty) patch responds nowhere


@pytest.mark.parametrize("dark", [False, True], ids=["bright-on-dark", "dark-on-bright"])
@pytest.mark.parametrize(("diameter", "side"), CASES)
def test_local_estimate_at_a_disc_centre(diameter, side, dark):
    plane, centres = disc_plane(diameter, side, dark=dark, seed=diameter + 1)
    for centre in centres[:3]:
        assert local_object_diameter(plane, centre) == pytest.approx(diameter, rel=0.3)


def test_local_estimate_sees_the_object_under_the_point_not_the_plane():
    rng = np.random.default_rng(5)
    plane = 0.1 + rng.normal(0, 0.02, (600, 600)).astype(np.float32)
    rows, cols = np.ogrid[:600, :600]
    plane[(rows - 150) ** 2 + (cols - 150) ** 2 <= 6**2] = 0.9  # a 12-px disc
    plane[(rows - 400) ** 2 + (cols - 400) ** 2 <= 40**2] = 0.9  # an 80-px disc
    assert local_object_diameter(plane, (150, 150)) == pytest.approx(12, rel=0.3)
    assert local_object_diameter(plane, (400.4, 399.6)) == pytest.approx(80, rel=0.3)
    capped = local_object_diameter(plane, (400, 400), max_diameter=30)
    assert capped is not None and MIN_DIAMETER <= capped <= 30 * 1.01


def test_bad_input_is_refused():
    plane = np.zeros((50, 60), np.float32)
    for point in [(-1, 5), (50, 5), (5, 60), (5, -0.6)]:
        with pytest.raises(ValueError, match="outside the plane"):
            local_object_diameter(plane, point)
    for bad in (np.zeros(10), np.zeros((4, 10, 10))):
        with pytest.raises(ValueError, match="one 2-D plane"):
            estimate_object_diameter(bad)


def test_the_search_range_is_sane():
    assert 0 < MIN_DIAMETER < 10 and MAX_DIAMETER >= 300


def test_gray_plane_of_uint16_and_rgb():
    rng = np.random.default_rng(0)
    image = (rng.random((300, 200)) * 1000 + 500).astype(np.uint16)
    image[100:120, 50:70] = 40000
    grey = gray_plane(image)
    assert grey.dtype == np.float32 and grey.shape == (300, 200)
    assert grey.min() == 0.0 and grey.max() == 1.0
    assert grey[110, 60] == 1.0 and np.median(grey) < 0.6  # robustly scaled: the block saturates
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 60, 90
    rgb[10:20, 10:20] = 250
    grey = gray_plane(rgb)
    assert grey.shape == (40, 50) and grey.dtype == np.float32
    assert grey[15, 15] == 1.0 and grey[0, 0] == 0.0  # channels averaged, then stretched
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(gray_plane(rgba), grey)  # alpha is ignored
    assert np.array_equal(gray_plane(np.full((20, 20), 7, np.uint16)), np.zeros((20, 20), np.float32))
