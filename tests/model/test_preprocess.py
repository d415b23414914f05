"""Preprocessing parity with the reference fixture, plus geometry and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_medplib.model.preprocess import (
    centre_pad_offsets,
    image_to_sam_boxes,
    image_to_sam_coords,
    prepare_clip_image,
    prepare_sam_image,
    read_clip_settings,
    region_mask_to_grid,
    resize_longest_side_hw,
    to_rgb_uint8,
)
from napari_medplib.testing import reference_fixture_dir


def fixture_dir() -> Path:
    """The tiny reference fixture; tests fail (not skip) when it is missing."""
    path = reference_fixture_dir()
    assert path.is_dir(), f"reference fixture not found at {path} (set MEDPLIB_TINY_REF)"
    return path


def case_dirs() -> list[Path]:
    cases = sorted((fixture_dir() / "cases").iterdir())
    assert cases, "the reference fixture has no cases"
    return cases


CASES = [p.name for p in case_dirs()]


def load_image(case: Path) -> np.ndarray:
    return np.asarray(Image.open(case / "image.png"))


@pytest.mark.parametrize("name", CASES)
def test_image_preprocessing_matches_reference(name):
    case = fixture_dir() / "cases" / name
    expected = np.load(case / "expected.npz")
    rgb = to_rgb_uint8(load_image(case))
    assert rgb.shape[:2] == tuple(expected["original_hw"])

    clip = prepare_clip_image(rgb)
    assert clip.resize_hw == tuple(expected["clip_resize_hw"])
    np.testing.assert_array_equal(clip.padded_uint8, expected["clip_padded_uint8"])
    assert clip.pixel_values.shape == (1, 3, 336, 336)
    assert np.abs(clip.pixel_values[0].numpy() - expected["clip_pixel_values"]).max() <= 1e-5

    sam = prepare_sam_image(rgb)
    assert sam.resize_hw == tuple(expected["sam_resize_hw"])
    assert sam.pixel_values.shape == (1, 3, 256, 256)
    assert np.abs(sam.pixel_values[0].numpy() - expected["sam_pixel_values"]).max() <= 1e-5


REGION_CASES = [n for n in CASES if (fixture_dir() / "cases" / n / "region.png").exists()]


def test_fixture_has_region_and_gray_cases():
    assert len(REGION_CASES) >= 3
    modes = {Image.open(fixture_dir() / "cases" / n / "image.png").mode for n in CASES}
    assert "L" in modes, "expected a grayscale PNG case"


@pytest.mark.parametrize("name", REGION_CASES)
def test_region_grid_matches_reference(name):
    case = fixture_dir() / "cases" / name
    expected = np.load(case / "expected.npz")
    region = np.asarray(Image.open(case / "region.png").convert("L"))
    grid = region_mask_to_grid(region > 0)
    np.testing.assert_array_equal(grid.mask_336, expected["region_mask_336"])
    np.testing.assert_array_equal(grid.mask_24, expected["region_mask_24"])
    assert grid.n_cells == int(expected["region_mask_24"].sum()) > 0


def test_resize_longest_side_rounds_like_reference():
    assert resize_longest_side_hw(300, 480, 256) == (160, 256)
    assert resize_longest_side_hw(420, 270, 256) == (256, 165)  # 164.57 -> 165
    assert resize_longest_side_hw(3, 1000, 256) == (1, 256)  # 0.768 + 0.5 -> 1
    assert resize_longest_side_hw(100, 100, 336) == (336, 336)
    with pytest.raises(ValueError, match="positive"):
        resize_longest_side_hw(0, 10, 256)


def test_centre_padding_puts_remainder_bottom_right():
    assert centre_pad_offsets((165, 256), 256) == (45, 0)
    assert centre_pad_offsets((256, 165), 256) == (0, 45)  # 91 // 2 left, 46 right
    sam = prepare_sam_image(np.full((100, 61, 3), 200, np.uint8))
    h, w = sam.resize_hw
    top, left = sam.pad
    assert (h, w) == (256, 156) and (top, left) == (0, 50)
    inside = sam.pixel_values[0, :, :, left : left + w]
    assert (inside != 0).all()
    assert (sam.pixel_values[0, :, :, :left] == 0).all() and (sam.pixel_values[0, :, :, left + w :] == 0).all()
    clip = prepare_clip_image(np.zeros((61, 100, 3), np.uint8))
    top = clip.pad[0]
    assert tuple(clip.padded_uint8[:, 0, 0]) == (122, 116, 104)
    assert (clip.padded_uint8[:, top : top + clip.resize_hw[0]] == 0).all()


def test_to_rgb_uint8_channels_and_errors():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (3, 4, 3) and (rgb == gray[:, :, None]).all()
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 3] = 255
    assert to_rgb_uint8(rgba).shape == (3, 4, 3) and to_rgb_uint8(rgba).max() == 0
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_uint8(np.zeros((3, 4), np.uint16))
    with pytest.raises(ValueError, match="plane"):
        to_rgb_uint8(np.zeros((2, 3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="to_rgb_uint8"):
        prepare_sam_image(gray)


def test_thin_region_vanishes_and_cells_are_top_left_pixels():
    mask = np.zeros((336, 336), bool)
    mask[:, 15:20] = True  # 5-px stroke between cell origins (cols 14 and 28)
    assert region_mask_to_grid(mask).n_cells == 0
    mask[:] = False
    mask[28, 42] = True  # a single pixel on a cell origin -> exactly that cell
    grid = region_mask_to_grid(mask)
    assert grid.n_cells == 1 and grid.mask_24[2, 3] == 1


def test_sam_coords_follow_resize_and_padding():
    # 256 x 512 image -> resized (128, 256), padded top 64.
    xy = image_to_sam_coords([[0, 0], [255, 511], [128, 256]], (256, 512), (128, 256), (64, 0))
    np.testing.assert_allclose(xy, [[0, 64], [255.5, 64 + 127.5], [128, 128]])
    boxes = image_to_sam_boxes([[10, 20, 30, 40]], (256, 512), (128, 256), (64, 0))
    np.testing.assert_allclose(boxes, [[10, 69, 20, 79]])
    with pytest.raises(ValueError, match="row, col"):
        image_to_sam_coords([1, 2, 3], (10, 10), (10, 10), (0, 0))


def test_clip_settings_come_from_the_processor_config(tmp_path):
    settings = read_clip_settings(fixture_dir() / "clip")
    assert settings.size == 336
    np.testing.assert_allclose(settings.mean, [0.48145466, 0.4578275, 0.40821073])
    np.testing.assert_allclose(settings.std, [0.26862954, 0.26130258, 0.27577711])
    (tmp_path / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}'
    )
    other = read_clip_settings(tmp_path)
    assert other.size == 224 and other.mean == (0.5, 0.5, 0.5)
    clip = prepare_clip_image(np.zeros((10, 20, 3), np.uint8), other.size, other.mean, other.std)
    assert clip.pixel_values.shape == (1, 3, 224, 224)
    assert tuple(clip.padded_uint8[:, 0, 0]) == (127, 127, 127)
    assert float(clip.pixel_values[0, 0, 112, 112]) == -1.0  # black pixel: (0 - 0.5) / 0.5
    with pytest.raises(ValueError, match="cannot read"):
        read_clip_settings(tmp_path / "missing")


def test_frame_brightness_is_the_grey_level_the_clip_tower_sees_and_nan_in_the_padding():
    import numpy as np
    import torch

    from napari_medplib.model.preprocess import frame_brightness, prepare_clip_image

    rgb = np.zeros((50, 100, 3), np.uint8)
    rgb[:, :50] = (255, 0, 0)  # left half red: grey 1/3; right half black
    clip = prepare_clip_image(rgb)
    grey = frame_brightness(clip)
    assert grey.shape == (336, 336) and clip.pad == (84, 0)
    assert torch.isnan(grey[:84]).all() and torch.isnan(grey[-84:]).all()
    inside = grey[84:252]
    assert not torch.isnan(inside).any()
    assert float(inside[:, :160].mean()) == pytest.approx(1 / 3, abs=1e-3) and float(inside[:, 176:].max()) == 0.0
