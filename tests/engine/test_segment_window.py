"""`Session.segment(window=...)`: large planes are segmented in a native-resolution crop around the prompts.

The tiny random SAM gives arbitrary masks, so where a mask's place matters the mask decoder is replaced by
a fake that puts positive logits where the prompt landed in SAM's 256 frame (or echoes the mask prior):
the mask then shows where the engine mapped the prompt in and the logits out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.engine import SessionInputError
from napari_medplib.engine.prompts import check_prompts
from napari_medplib.engine.window import (
    MARGIN,
    check_window,
    choose_window,
    whole_plane_limits,
)
from napari_medplib.imaging import DEFAULT_PERCENTILES, to_model_rgb
from napari_medplib.model.preprocess import prepare_sam_image

SAM = 256


def window_for(image_hw, points=None, box=None, mask=None, window="auto"):
    pts, _, box_arr, prior = check_prompts(points, None, box, mask, image_hw)
    return choose_window(image_hw, SAM, pts, box_arr, prior, window)


def contains(window, y0, x0, y1, x1) -> bool:
    return window[0] <= y0 and window[1] <= x0 and y1 < window[2] and x1 < window[3]


@pytest.fixture
def big_image():
    """700x1100 uint16 (the HeLa frame size): dim noise, one bright blob on the right."""
    rng = np.random.default_rng(0)
    image = (rng.random((700, 1100)) * 100 + 100).astype(np.uint16)
    image[300:380, 850:950] += 20000
    return image


def fake_decoder(session, monkeypatch):
    """Replace SAM's mask decoder: +10 logits on the 3x3 low-res cells around the prompt, -10 elsewhere."""
    calls = []

    def decode(embeddings, points=None, point_labels=None, boxes=None, mask_inputs=None, multimask_output=False):
        calls.append({"points": points, "boxes": boxes, "mask_inputs": mask_inputs})
        if points is None and boxes is None:
            logits = torch.as_tensor(mask_inputs, dtype=torch.float32).clone()
        else:
            x, y = (points[0, 0] if points is not None else boxes[0].reshape(2, 2).mean(axis=0))
            r, c = int(y // 4), int(x // 4)
            logits = torch.full((1, 1, 64, 64), -10.0)
            logits[0, 0, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = 10.0
        return logits, torch.ones(1, 1)

    monkeypatch.setattr(session.model.sam, "decode_with_prompts", decode)
    return calls


def centroid(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


# ------------------------------------------------------------------------------------ geometry
def test_small_image_has_no_window():
    assert window_for((300, 380), points=[(150, 200)]) is None  # 380 <= 1.5 x 256
    assert window_for((300, 380), points=[(150, 200)], window=128) is not None  # an int always windows


def test_point_in_the_middle_gets_a_sam_sized_window_around_it():
    win = window_for((700, 1100), points=[(350, 600)])
    assert (win[2] - win[0], win[3] - win[1]) == (SAM, SAM)
    centre = ((win[0] + win[2]) / 2, (win[1] + win[3]) / 2)
    assert abs(centre[0] - 350.5) <= SAM / 8 and abs(centre[1] - 600.5) <= SAM / 8
    assert contains(win, 350 - MARGIN // 2, 600 - MARGIN // 2, 350 + MARGIN // 2, 600 + MARGIN // 2)


@pytest.mark.parametrize("point", [(2, 3), (697, 1098), (0, 1099), (699, 0)])
def test_corner_prompts_shift_the_window_inside_the_image(point):
    win = window_for((700, 1100), points=[point])
    assert 0 <= win[0] and 0 <= win[1] and win[2] <= 700 and win[3] <= 1100
    assert (win[2] - win[0], win[3] - win[1]) == (SAM, SAM)
    assert contains(win, *point, *point)


def test_box_larger_than_the_sam_input_gets_twice_its_extent():
    box = (200, 400, 499, 579)  # 300 x 180 px
    win = window_for((700, 1100), box=box)
    side = win[3] - win[1]
    assert side == 2 * 300 + MARGIN and win[2] - win[0] == side
    assert contains(win, *box)


def test_wide_spread_points_use_the_whole_image():
    assert window_for((700, 1100), points=[(10, 10), (690, 1090)], box=None) is None


def test_window_taller_than_the_image_is_clipped_on_that_axis():
    win = window_for((500, 1100), points=[(50, 300), (450, 500)])  # extent 401 -> side 866
    assert win[0] == 0 and win[2] == 500 and win[3] - win[1] == 2 * 401 + MARGIN
    assert contains(win, 50, 300, 450, 500)


def test_int_window_is_the_side_unless_the_prompts_need_more():
    win = window_for((700, 1100), points=[(300, 300)], window=128)
    assert (win[2] - win[0], win[3] - win[1]) == (128, 128) and contains(win, 300, 300, 300, 300)
    win = window_for((700, 1100), box=(100, 100, 299, 199), window=128)
    assert win[2] - win[0] == 200 + MARGIN and contains(win, 100, 100, 299, 199)


def test_mask_prior_counts_in_the_extent():
    prior = np.zeros((700, 1100), bool)
    prior[600:690, 20:100] = True
    win = window_for((700, 1100), mask=prior)
    assert contains(win, 600, 20, 689, 99)


def test_random_prompts_always_fit_inside_their_window():
    rng = np.random.default_rng(3)
    for _ in range(200):
        h, w = int(rng.integers(400, 1500)), int(rng.integers(400, 1500))
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = min(h - 1, y0 + int(rng.integers(0, 300))), min(w - 1, x0 + int(rng.integers(0, 300)))
        win = window_for((h, w), box=(y0, x0, y1, x1))
        if win is None:
            assert 2 * max(y1 - y0 + 1, x1 - x0 + 1) + MARGIN >= max(h, w)
            continue
        assert 0 <= win[0] < win[2] <= h and 0 <= win[1] < win[3] <= w
        spare = MARGIN // 2
        assert contains(win, y0, x0, y1, x1)
        assert win[0] == 0 or y0 - win[0] >= spare
        assert win[1] == 0 or x0 - win[1] >= spare
        assert win[2] == h or win[2] - 1 - y1 >= spare
        assert win[3] == w or win[3] - 1 - x1 >= spare


@pytest.mark.parametrize("side", [100, 200, 300])
def test_int_windows_keep_a_margin_around_large_prompts(side):
    rng = np.random.default_rng(side)
    for _ in range(100):
        y0, x0 = (int(v) for v in rng.integers(100, 500, 2))
        size = int(rng.integers(1, 400))
        box = (y0, x0, y0 + size, x0 + size // 2)
        win = window_for((1000, 1400), box=box, window=side)
        assert min(box[0] - win[0], box[1] - win[1], win[2] - 1 - box[2], win[3] - 1 - box[3]) >= min(
            MARGIN // 2, (win[2] - win[0] - size - 1) // 2)


@pytest.mark.parametrize("bad", [-3, "big", True, 2.5])
def test_bad_window_values_are_refused(bad):
    with pytest.raises(SessionInputError, match="window must be"):
        check_window(bad)


def test_window_values():
    assert [check_window(v) for v in ("auto", "AUTO", None, "none", 0, "0", 300, "300")] == [
        "auto", "auto", None, None, None, None, 300, 300]


# ------------------------------------------------------------------------------------ segment
def test_point_lands_at_the_same_place_in_the_crop(tiny_session, big_image, monkeypatch):
    fake_decoder(tiny_session, monkeypatch)
    click = (310, 700)
    windowed = tiny_session.segment(big_image, points=[click])
    whole = tiny_session.segment(big_image, points=[click], window=None)
    for result in (windowed, whole):
        assert result.mask.shape == big_image.shape and result.mask[click]
    y0, x0, y1, x1 = windowed.window
    assert (y1 - y0, x1 - x0) == (SAM, SAM)
    assert not windowed.mask[:y0].any() and not windowed.mask[y1:].any()
    assert not windowed.mask[:, :x0].any() and not windowed.mask[:, x1:].any()
    cy, cx = centroid(windowed.mask)
    assert abs(cy - click[0]) <= 4 and abs(cx - click[1]) <= 4
    # 3x3 low-res cells = 12 SAM px: 12 image px in the native window, 1100/256 times more on the frame
    assert np.ptp(np.nonzero(windowed.mask)[1]) <= 20 < np.ptp(np.nonzero(whole.mask)[1])
    assert whole.window == (0, 0, *big_image.shape)


def test_box_near_a_corner_maps_in_and_out(tiny_session, big_image, monkeypatch):
    calls = fake_decoder(tiny_session, monkeypatch)
    box = (5, 1040, 40, 1095)
    result = tiny_session.segment(big_image, box=box)
    assert result.window == (0, 1100 - SAM, SAM, 1100)
    # in the crop the box is at (5, 196, 40, 251), 1 crop px = 1 SAM px: SAM gets (x0, y0, x1, y1)
    np.testing.assert_allclose(calls[0]["boxes"][0], [196, 5, 251, 40])
    cy, cx = centroid(result.mask)
    assert abs(cy - 22.5) <= 4 and abs(cx - 1067.5) <= 4


def test_mask_prior_is_cut_to_the_same_window(tiny_session, big_image, monkeypatch):
    fake_decoder(tiny_session, monkeypatch)  # a mask-only prompt: the decoder echoes the prior
    prior = np.zeros(big_image.shape, bool)
    prior[600:660, 30:110] = True
    result = tiny_session.segment(big_image, mask=prior)
    assert contains(result.window, 600, 30, 659, 109) and result.window != (0, 0, 700, 1100)
    iou = (result.mask & prior).sum() / (result.mask | prior).sum()
    assert iou > 0.8


def test_sam_sees_the_crop_with_the_whole_planes_contrast(tiny_session, big_image, count_calls, monkeypatch):
    seen = []
    original = tiny_session.model.sam.encode_image
    monkeypatch.setattr(tiny_session.model.sam, "encode_image", lambda px: seen.append(px) or original(px))
    result = tiny_session.segment(big_image, points=[(100, 200)])  # dim background, far from the blob
    y0, x0, y1, x1 = result.window
    expected = prepare_sam_image(to_model_rgb(big_image)[y0:y1, x0:x1], SAM).pixel_values
    restretched = prepare_sam_image(to_model_rgb(big_image[y0:y1, x0:x1]), SAM).pixel_values
    assert torch.equal(seen[0], expected)
    assert not torch.equal(seen[0], restretched)


def test_explicit_contrast_limits_and_rgb_are_kept(tiny_session, monkeypatch):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)
    seen = []
    original = tiny_session.model.sam.encode_image
    monkeypatch.setattr(tiny_session.model.sam, "encode_image", lambda px: seen.append(px) or original(px))
    result = tiny_session.segment(image, points=[(300, 450)], contrast_limits=(50, 200), rgb=True)
    y0, x0, y1, x1 = result.window
    expected = prepare_sam_image(to_model_rgb(image, (50, 200), rgb=True)[y0:y1, x0:x1], SAM).pixel_values
    assert torch.equal(seen[0], expected)


def test_block_reduced_planes_crop_the_raw_data_with_whole_plane_limits(tiny_session, big_image, monkeypatch):
    import napari_medplib.engine.image as image_module

    monkeypatch.setattr(image_module, "LARGE_SIDE", 300)  # 1100 px -> a 4x reduced view
    fake_decoder(tiny_session, monkeypatch)
    seen = []
    original = tiny_session.model.sam.encode_image
    monkeypatch.setattr(tiny_session.model.sam, "encode_image", lambda px: seen.append(px) or original(px))
    click = (150, 300)
    result = tiny_session.segment(big_image, points=[click])
    y0, x0, y1, x1 = result.window
    limits = whole_plane_limits(big_image, False)
    assert abs(limits[1] - np.percentile(big_image, DEFAULT_PERCENTILES[1])) < 500  # the blob is counted
    assert limits[1] > np.percentile(big_image[y0:y1, x0:x1], 100) + 1000  # not the crop's own range
    expected = prepare_sam_image(to_model_rgb(big_image[y0:y1, x0:x1], limits), SAM).pixel_values
    assert torch.equal(seen[0], expected)
    cy, cx = centroid(result.mask)
    assert abs(cy - click[0]) <= 4 and abs(cx - click[1]) <= 4


def test_a_second_click_in_the_same_window_reuses_the_embedding(tiny_session, big_image, count_calls):
    encode = count_calls(tiny_session.model.sam, "encode_image")
    first = tiny_session.segment(big_image, points=[(300, 450)])
    second = tiny_session.segment(big_image, points=[(304, 447)], point_labels=[1])
    assert second.window == first.window and second.image_key == first.image_key
    assert encode.calls == 1
    far = tiny_session.segment(big_image, points=[(600, 1000)])
    assert far.window != first.window and encode.calls == 2
    tiny_session.segment(big_image, points=[(300, 450)])
    assert encode.calls == 2  # the first window is still cached


def test_window_none_and_small_images_take_the_whole_plane_path(tiny_session, image16, big_image):
    for image, prompt in ((image16, {"points": [(30, 50)]}), (big_image, {"box": (300, 850, 379, 949)})):
        a = tiny_session.segment(image, **prompt, window=None)
        b = tiny_session.segment(image, **prompt, window=max(image.shape))  # side reaches the image
        assert a.window == b.window == (0, 0, *image.shape)
        assert a.image_key == b.image_key == tiny_session.embed(image)
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True)) and a.scores == b.scores
    auto = tiny_session.segment(image16, points=[(30, 50)])
    assert auto.window == (0, 0, *image16.shape)


def test_window_none_matches_the_documented_whole_plane_pipeline(tiny_session, big_image):
    from napari_medplib.engine.image import low_res_to_masks, make_view, sam_prompt_coords

    sam = tiny_session.model.sam
    result = tiny_session.segment(big_image, points=[(310, 700)], window=None, multimask=True)
    view = make_view(big_image)
    sam_input = prepare_sam_image(view.rgb, SAM)
    with torch.inference_mode():
        embeddings = sam.encode_image(sam_input.pixel_values)
        coords = sam_prompt_coords([(310, 700)], view, sam_input.resize_hw, sam_input.pad)[None]
        low_res, iou = sam.decode_with_prompts(embeddings, points=coords, point_labels=np.ones((1, 1)),
                                               multimask_output=True)
    masks = low_res_to_masks(low_res[0][:, None], view, sam_input.resize_hw, sam_input.pad)
    assert all(np.array_equal(x, y) for x, y in zip(result.masks, masks, strict=True))
    assert result.scores == [float(v) for v in iou[0].tolist()]


def test_bad_window_is_refused_by_segment(tiny_session, big_image):
    with pytest.raises(SessionInputError, match="window must be"):
        tiny_session.segment(big_image, points=[(10, 10)], window="large")


# ------------------------------------------------------------------------------------ CLI
def test_cli_window_flag_parsing():
    from napari_medplib.cli import EXIT_BAD_INPUT, build_parser

    parser = build_parser()
    parse = lambda *extra: parser.parse_args(["segment", "x.tif", "--point", "1", "2", *extra]).window  # noqa: E731
    assert parse() == "auto"
    assert parse("--window", "auto") == "auto"
    assert parse("--window", "none") is None
    assert parse("--window", "300") == 300
    with pytest.raises(SystemExit) as exc:
        parse("--window", "huge")
    assert exc.value.code == EXIT_BAD_INPUT


def test_cli_passes_the_window_to_the_session(tiny_model_folder, big_image, tmp_path, monkeypatch, capsys):
    import tifffile

    from napari_medplib.cli import main
    from napari_medplib.engine import Session

    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, big_image)
    windows = []
    original = Session.segment

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        windows.append((kwargs.get("window"), result.window))
        return result

    monkeypatch.setattr(Session, "segment", spy)
    base = ["segment", str(path), "--point", "300", "450", "--model", str(tiny_model_folder), "--json"]
    assert main([*base, "--window", "128"]) == 0
    assert main(base) == 0
    assert main([*base, "--window", "none"]) == 0
    capsys.readouterr()
    assert [w for w, _ in windows] == [128, "auto", None]
    sides = [(r[2] - r[0], r[3] - r[1]) for _, r in windows]
    assert sides == [(128, 128), (SAM, SAM), big_image.shape]
