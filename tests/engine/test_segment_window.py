"""`Session.segment(window=...)`: SAM runs on a crop around the prompts, sized so the object spans about
``scale.PROMPT_OBJECT_EXTENT`` of SAM's 256-px input (a click on an object of unknown size assumes
``scale.MODEL_OBJECT_EXTENT`` pixels, the training frames' typical object).

The tiny random SAM gives arbitrary masks, so where a mask's place matters the mask decoder is replaced by
a fake that puts positive logits where the prompt landed in SAM's 256 frame (or echoes the mask prior):
the mask then shows where the engine mapped the prompt in and the logits out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_medplib.cache import content_key
from napari_medplib.engine import SessionInputError
from napari_medplib.engine.image import make_view
from napari_medplib.engine.prompts import check_prompts
from napari_medplib.engine.scale import MODEL_OBJECT_EXTENT, PROMPT_OBJECT_EXTENT
from napari_medplib.engine.session import CLICK_EXTENT_FACTOR
from napari_medplib.engine.window import (
    MARGIN,
    MIN_CONTEXT,
    MIN_SIDE,
    auto_side,
    check_window,
    choose_window,
    mirror_prompts,
    unmirror,
    whole_plane_limits,
)
from napari_medplib.imaging import DEFAULT_PERCENTILES, to_model_rgb
from napari_medplib.model.preprocess import prepare_sam_image

SAM = 256
TARGET = PROMPT_OBJECT_EXTENT


def window_for(image_hw, points=None, box=None, mask=None, window="auto", object_extent=None):
    pts, _, box_arr, prior = check_prompts(points, None, box, mask, image_hw)
    return choose_window(image_hw, SAM, pts, box_arr, prior, window, object_extent=object_extent)


def contains(window, y0, x0, y1, x1) -> bool:
    return window[0] <= y0 and window[1] <= x0 and y1 < window[2] and x1 < window[3]


def sides(window) -> tuple[int, int]:
    return window[2] - window[0], window[3] - window[1]


def box_extent(box) -> int:
    return max(box[2] - box[0] + 1, box[3] - box[1] + 1)


def add_disc(image, cy, cx, diameter, value=20000):
    rows, cols = np.ogrid[: image.shape[0], : image.shape[1]]
    image[(rows - cy) ** 2 + (cols - cx) ** 2 <= (diameter / 2) ** 2] += value


#: Small bright discs of big_image (centre, diameter): clicks on them get a crop near SAM's size.
DISCS = {(310, 700): 12, (150, 300): 12, (100, 200): 12, (600, 1000): 12, (300, 450): 16}


@pytest.fixture
def big_image():
    """700x1100 uint16 (the HeLa frame size): dim noise, one large bright block on the right, small bright discs."""
    rng = np.random.default_rng(0)
    image = (rng.random((700, 1100)) * 100 + 100).astype(np.uint16)
    image[300:380, 850:950] += 20000
    for centre, diameter in DISCS.items():
        add_disc(image, *centre, diameter)
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


def clicked_side(session, image, point) -> int:
    """The auto crop side the session picks for one positive click (its estimated object extent + 1 px)."""
    extent = session.adapter.clicked_extent(make_view(image), np.array([point], float), np.array([1]))
    return auto_side(1 + extent, SAM, TARGET)


# ------------------------------------------------------------------------------------ the side rule
def test_auto_side_puts_the_object_at_the_models_extent():
    previous = 0
    for extent in range(1, 600):
        side = auto_side(extent, SAM, TARGET)
        assert side >= previous, "a larger object never gets a smaller crop"
        previous = side
        assert side >= extent + MIN_CONTEXT and side >= MIN_SIDE
        if extent * SAM / TARGET > max(extent + MIN_CONTEXT, MIN_SIDE):  # no floor in force
            # the object spans TARGET SAM px, less by at most the quarter-octave rounding (2 ** 0.25)
            assert TARGET / 2**0.25 - 0.2 <= extent * SAM / side <= TARGET
    assert auto_side(28, SAM, 28.0) == SAM  # an object of the training size: the crop is SAM's input
    assert auto_side(1, SAM, TARGET) == MIN_SIDE
    assert auto_side(10, SAM, TARGET) == 54  # 53.3 px wanted, rounded up to 2 ** (23 / 4)
    assert auto_side(100, SAM, 2 * TARGET) == auto_side(50, SAM, TARGET)  # target_extent is honoured


def test_sides_are_quarter_octaves_so_similar_objects_share_a_crop():
    values = {auto_side(e, SAM, TARGET) for e in range(5, 600)}
    assert values <= {math.ceil(2 ** (k / 4)) for k in range(80)}
    assert len(values) <= 4 * math.log2(600 / 5) + 2  # ~4 sides per doubling, not one per pixel
    # two boxes of extent 45 and 48 (= TARGET) around nearly the same centre: one crop, one cached SAM
    # embedding, and an object of the prompt extent gets a crop of SAM's own input size
    a = window_for((700, 1100), box=(300, 500, 344, 544))
    b = window_for((700, 1100), box=(301, 502, 348, 549))
    assert box_extent((301, 502, 348, 549)) == TARGET
    assert a == b and sides(a) == (auto_side(45, SAM, TARGET),) * 2 == (SAM, SAM)


@pytest.mark.parametrize("extent", [6, 10, 20])
def test_a_small_box_gets_a_small_crop_that_sam_upsamples(extent):
    box = (340, 540, 340 + extent - 1, 540 + extent - 1)
    win = window_for((700, 1100), box=box)
    side = auto_side(extent, SAM, TARGET)
    assert sides(win) == (side, side) and side < SAM
    assert contains(win, *box)
    assert 0.8 * TARGET <= extent * SAM / side <= TARGET  # the box spans about TARGET SAM pixels


@pytest.mark.parametrize("box", [(200, 400, 319, 489), (100, 1000, 299, 1149)])  # extents 120 and 200
def test_a_large_box_gets_a_large_crop(box):
    win = window_for((3000, 4000), box=box)
    side = auto_side(box_extent(box), SAM, TARGET)
    assert sides(win) == (side, side) and side >= box_extent(box) * SAM / TARGET > 2 * SAM  # SAM shrinks it
    assert contains(win, *box)
    assert 0.8 * TARGET <= box_extent(box) * SAM / side <= TARGET


def test_small_planes_are_cropped_when_the_object_is_small():
    win = window_for((300, 380), box=(150, 200, 159, 209))  # a 10-px object on a small plane
    assert sides(win) == (auto_side(10, SAM, TARGET),) * 2 and contains(win, 150, 200, 159, 209)
    win = window_for((300, 380), points=[(150, 200)], object_extent=8)  # a click on an 8-px object
    assert sides(win) == (auto_side(1 + 8, SAM, TARGET),) * 2 and contains(win, 150, 200, 150, 200)
    # a 70-px object on the same plane needs a crop larger than the plane: the whole plane
    assert auto_side(70, SAM, TARGET) >= 380 > auto_side(60, SAM, TARGET)
    assert window_for((300, 380), box=(100, 100, 169, 169)) is None
    assert window_for((300, 380), box=(100, 100, 159, 159)) is not None


def test_clicks_use_their_spread_plus_the_object_extent():
    assert sides(window_for((2000, 2000), points=[(1000, 1000)], object_extent=40)) == (auto_side(41, SAM, TARGET),) * 2
    two = window_for((2000, 2000), points=[(1000, 1000), (1000, 1029)], object_extent=40)
    assert sides(two) == (auto_side(30 + 40, SAM, TARGET),) * 2 and contains(two, 1000, 1000, 1000, 1029)
    # without an estimate a click stands for an object of the model's own size
    unknown = window_for((2000, 2000), points=[(1000, 1000)])
    assert sides(unknown) == (auto_side(1 + MODEL_OBJECT_EXTENT, SAM, TARGET),) * 2
    # a box or a prior gives the extent itself: an object_extent is ignored with them
    boxed = window_for((2000, 2000), points=[(1000, 1000)], box=(990, 990, 1009, 1009), object_extent=500)
    assert sides(boxed) == (auto_side(20, SAM, TARGET),) * 2


# ------------------------------------------------------------------------------------ placement
def test_point_in_the_middle_gets_a_window_centred_on_it():
    win = window_for((700, 1100), points=[(350, 600)], object_extent=TARGET - 1)  # extent 48: a SAM-sized crop
    assert sides(win) == (SAM, SAM)
    centre = ((win[0] + win[2]) / 2, (win[1] + win[3]) / 2)
    assert abs(centre[0] - 350.5) <= SAM / 8 and abs(centre[1] - 600.5) <= SAM / 8
    assert contains(win, 350 - MARGIN // 2, 600 - MARGIN // 2, 350 + MARGIN // 2, 600 + MARGIN // 2)


@pytest.mark.parametrize("point", [(2, 3), (697, 1098), (0, 1099), (699, 0)])
@pytest.mark.parametrize("object_extent", [5, 27, 60])
def test_corner_prompts_shift_the_window_inside_the_image(point, object_extent):
    win = window_for((700, 1100), points=[point], object_extent=object_extent)
    side = auto_side(1 + object_extent, SAM, TARGET)
    assert 0 <= win[0] and 0 <= win[1] and win[2] <= 700 and win[3] <= 1100
    assert sides(win) == (side, side)
    assert contains(win, *point, *point)
    assert win[0] in (0, 700 - side) and win[1] in (0, 1100 - side)  # flush with the corner's two edges


def test_wide_spread_points_use_the_whole_image():
    assert window_for((700, 1100), points=[(10, 10), (690, 1090)], object_extent=10) is None


def test_a_side_reaching_the_image_is_the_whole_image():
    box = (300, 300, 399, 399)  # extent 100 -> side 609
    side = auto_side(100, SAM, TARGET)
    assert side == 609
    assert window_for((700, 1100), box=box) is not None
    assert window_for((500, side), box=box) is None  # the side equals the longer side
    assert window_for((side, 500), box=box) is None
    assert window_for((500, side + 1), box=box) is not None  # one pixel more: a crop


def test_window_taller_than_the_image_is_clipped_on_that_axis():
    box = (50, 1000, 149, 1099)  # extent 100 -> side 609, on a 500-px-high plane
    win = window_for((500, 3000), box=box)
    side = auto_side(100, SAM, TARGET)
    assert win[0] == 0 and win[2] == 500 and win[3] - win[1] == side
    assert contains(win, *box)


def test_int_window_is_the_side_unless_the_prompts_need_more():
    win = window_for((700, 1100), points=[(300, 300)], window=128)
    assert sides(win) == (128, 128) and contains(win, 300, 300, 300, 300)
    win = window_for((700, 1100), box=(100, 100, 299, 199), window=128)
    assert win[2] - win[0] == 200 + MARGIN and contains(win, 100, 100, 299, 199)
    # an int windows small planes too, and ignores the object's size
    assert sides(window_for((300, 380), points=[(150, 200)], window=128, object_extent=200)) == (128, 128)


def test_mask_prior_counts_in_the_extent():
    prior = np.zeros((1500, 2000), bool)
    prior[1300:1390, 20:100] = True  # 90 x 80 px
    win = window_for((1500, 2000), mask=prior)
    assert sides(win) == (auto_side(90, SAM, TARGET),) * 2
    assert contains(win, 1300, 20, 1389, 99)


def test_random_boxes_always_fit_inside_their_window_with_spare_room():
    rng = np.random.default_rng(3)
    cropped = 0
    for _ in range(300):
        h, w = int(rng.integers(100, 3000)), int(rng.integers(100, 3000))
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = min(h - 1, y0 + int(rng.integers(0, 150))), min(w - 1, x0 + int(rng.integers(0, 150)))
        win = window_for((h, w), box=(y0, x0, y1, x1))
        side = auto_side(max(y1 - y0 + 1, x1 - x0 + 1), SAM, TARGET)
        if win is None:
            assert side >= max(h, w)
            continue
        cropped += 1
        assert 0 <= win[0] < win[2] <= h and 0 <= win[1] < win[3] <= w
        assert win[2] - win[0] == min(side, h) and win[3] - win[1] == min(side, w)
        assert contains(win, y0, x0, y1, x1)
        spare_y = min(MARGIN // 2, (side - (y1 - y0 + 1)) // 4)
        spare_x = min(MARGIN // 2, (side - (x1 - x0 + 1)) // 4)
        assert win[0] == 0 or y0 - win[0] >= spare_y
        assert win[1] == 0 or x0 - win[1] >= spare_x
        assert win[2] == h or win[2] - 1 - y1 >= spare_y
        assert win[3] == w or win[3] - 1 - x1 >= spare_x
    assert cropped > 150


@pytest.mark.parametrize("side", [100, 200, 300])
def test_int_windows_keep_a_margin_around_large_prompts(side):
    rng = np.random.default_rng(side)
    for _ in range(100):
        y0, x0 = (int(v) for v in rng.integers(100, 500, 2))
        size = int(rng.integers(1, 400))
        box = (y0, x0, y0 + size, x0 + size // 2)
        win = window_for((1000, 1400), box=box, window=side)
        assert min(box[0] - win[0], box[1] - win[1], win[2] - 1 - box[2], win[3] - 1 - box[3]) >= min(
            MARGIN // 2, (win[2] - win[0] - size - 1) // 4)


@pytest.mark.parametrize("bad", [-3, "big", True, 2.5])
def test_bad_window_values_are_refused(bad):
    with pytest.raises(SessionInputError, match="window must be"):
        check_window(bad)


def test_window_values():
    assert [check_window(v) for v in ("auto", "AUTO", None, "none", 0, "0", 300, "300")] == [
        "auto", "auto", None, None, None, None, 300, 300]


# ------------------------------------------------------------------------------------ clicked extent
@pytest.mark.parametrize("diameter", [10, 24, 50])
def test_clicked_extent_follows_the_object_under_the_click(tiny_session, diameter):
    rng = np.random.default_rng(diameter)
    image = (rng.random((600, 800)) * 200 + 1000).astype(np.uint16)
    add_disc(image, 300, 400, diameter)
    extent = tiny_session.adapter.clicked_extent(make_view(image), np.array([(300.0, 400.0)]), np.array([1]))
    assert extent == pytest.approx(CLICK_EXTENT_FACTOR * diameter, rel=0.3)


def test_clicked_extent_uses_the_first_positive_click_and_the_full_resolution_scale(tiny_session, monkeypatch):
    import napari_medplib.engine.image as image_module

    rng = np.random.default_rng(1)
    image = (rng.random((800, 1200)) * 200 + 1000).astype(np.uint16)
    add_disc(image, 200, 300, 16)
    add_disc(image, 500, 900, 60)
    view = make_view(image)
    points = np.array([(200.0, 300.0), (500.0, 900.0)])
    small = tiny_session.adapter.clicked_extent(view, points, np.array([1, 1]))
    big = tiny_session.adapter.clicked_extent(view, points, np.array([0, 1]))  # the negative click is skipped
    assert small == pytest.approx(CLICK_EXTENT_FACTOR * 16, rel=0.3)
    assert big == pytest.approx(CLICK_EXTENT_FACTOR * 60, rel=0.3)
    assert tiny_session.adapter.clicked_extent(view, points, np.array([0, 0])) is None
    monkeypatch.setattr(image_module, "LARGE_SIDE", 400)  # a 3x block-reduced view: still image pixels
    reduced = make_view(image)
    assert reduced.factor == 3
    assert tiny_session.adapter.clicked_extent(reduced, points[1:], np.array([1])) == pytest.approx(big, rel=0.3)


def test_a_click_on_a_big_object_gets_a_bigger_crop(tiny_session):
    rng = np.random.default_rng(2)
    image = (rng.random((1500, 2000)) * 200 + 1000).astype(np.uint16)
    add_disc(image, 400, 500, 10)
    add_disc(image, 1000, 1400, 60)
    small = tiny_session.segment(image, points=[(400, 500)])
    big = tiny_session.segment(image, points=[(1000, 1400)])
    assert sides(small.window) == (clicked_side(tiny_session, image, (400, 500)),) * 2
    assert sides(big.window) == (clicked_side(tiny_session, image, (1000, 1400)),) * 2
    assert 3 * sides(small.window)[0] < sides(big.window)[0] < 2000
    # each object spans about TARGET SAM pixels in its crop: CLICK_EXTENT_FACTOR x the blob diameter is the
    # extent assumed
    for diameter, result in ((10, small), (60, big)):
        spanned = CLICK_EXTENT_FACTOR * diameter * SAM / sides(result.window)[0]
        assert 0.6 * TARGET < spanned < 1.4 * TARGET
    # a click with window=None or an int window does not look at the object at all
    fixed = tiny_session.segment(image, points=[(1000, 1400)], window=128).window
    assert sides(fixed) == (128, 128) and contains(fixed, 1000, 1400, 1000, 1400)


# ------------------------------------------------------------------------------------ segment
def test_point_lands_at_the_same_place_in_the_crop(tiny_session, big_image, monkeypatch):
    fake_decoder(tiny_session, monkeypatch)
    click = (310, 700)
    windowed = tiny_session.segment(big_image, points=[click])
    whole = tiny_session.segment(big_image, points=[click], window=None)
    for result in (windowed, whole):
        assert result.mask.shape == big_image.shape and result.mask[click]
    y0, x0, y1, x1 = windowed.window
    side = clicked_side(tiny_session, big_image, click)
    assert (y1 - y0, x1 - x0) == (side, side) and side < 300
    assert not windowed.mask[:y0].any() and not windowed.mask[y1:].any()
    assert not windowed.mask[:, :x0].any() and not windowed.mask[:, x1:].any()
    cy, cx = centroid(windowed.mask)
    assert abs(cy - click[0]) <= 4 and abs(cx - click[1]) <= 4
    # 3x3 low-res cells = 12 SAM px: 12 x side / 256 image px in the crop, 1100/256 times more on the frame
    assert np.ptp(np.nonzero(windowed.mask)[1]) <= 12 * side / SAM + 4 < np.ptp(np.nonzero(whole.mask)[1])
    assert whole.window == (0, 0, *big_image.shape)


@pytest.mark.parametrize(("box", "window", "sam_box"), [
    ((5, 1048, 52, 1095), (0, 844, 256, 1100), [204, 5, 251, 52]),  # extent 48 (TARGET): crop = SAM input, 1:1
    ((5, 1072, 28, 1095), (0, 972, 128, 1100), [200, 10, 246, 56]),  # extent 24: a 128-px crop, 2x up
    ((5, 1000, 100, 1095), (0, 588, 512, 1100), [206, 2.5, 253.5, 50]),  # extent 96: a 512-px crop, 2x down
])
def test_box_near_a_corner_maps_in_and_out(tiny_session, big_image, monkeypatch, box, window, sam_box):
    calls = fake_decoder(tiny_session, monkeypatch)
    result = tiny_session.segment(big_image, box=box)
    side = auto_side(box_extent(box), SAM, TARGET)
    assert side == SAM * box_extent(box) / TARGET  # the box spans exactly TARGET SAM pixels
    assert result.window == window == (0, 1100 - side, side, 1100)  # flush with the top-right corner
    np.testing.assert_allclose(calls[0]["boxes"][0], sam_box)  # SAM gets (x0, y0, x1, y1)
    cy, cx = centroid(result.mask)
    pixel = (window[2] - window[0]) / SAM  # image pixels per SAM pixel
    assert abs(cy - (box[0] + box[2]) / 2) <= 4 * pixel and abs(cx - (box[1] + box[3]) / 2) <= 4 * pixel


def test_mask_prior_is_cut_to_the_same_window(tiny_session, big_image, monkeypatch):
    fake_decoder(tiny_session, monkeypatch)  # a mask-only prompt: the decoder echoes the prior
    prior = np.zeros(big_image.shape, bool)
    prior[600:640, 30:70] = True  # 40 px -> a 216-px crop
    result = tiny_session.segment(big_image, mask=prior)
    assert contains(result.window, 600, 30, 639, 69) and sides(result.window) == (auto_side(40, SAM, TARGET),) * 2
    iou = (result.mask & prior).sum() / (result.mask | prior).sum()
    assert iou > 0.8


def test_sam_sees_the_crop_with_the_whole_planes_contrast(tiny_session, big_image, monkeypatch):
    seen = []
    original = tiny_session.model.sam.encode_image
    monkeypatch.setattr(tiny_session.model.sam, "encode_image", lambda px: seen.append(px) or original(px))
    result = tiny_session.segment(big_image, points=[(100, 200)])  # a small disc far from the big block
    y0, x0, y1, x1 = result.window
    assert (y1 - y0, x1 - x0) != big_image.shape and not contains(result.window, 300, 850, 379, 949)
    expected = prepare_sam_image(to_model_rgb(big_image)[y0:y1, x0:x1], SAM).pixel_values
    restretched = prepare_sam_image(to_model_rgb(big_image[y0:y1, x0:x1]), SAM).pixel_values
    assert torch.equal(seen[0], expected)
    assert not torch.equal(seen[0], restretched)


def test_explicit_contrast_limits_and_rgb_are_kept(tiny_session, monkeypatch):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)
    image[290:310, 440:460] = 255  # a white square under the click: a crop well inside the image
    seen = []
    original = tiny_session.model.sam.encode_image
    monkeypatch.setattr(tiny_session.model.sam, "encode_image", lambda px: seen.append(px) or original(px))
    result = tiny_session.segment(image, points=[(300, 450)], contrast_limits=(50, 200), rgb=True)
    y0, x0, y1, x1 = result.window
    assert (y1 - y0, x1 - x0) != image.shape[:2]
    expected = prepare_sam_image(to_model_rgb(image, (50, 200), rgb=True)[y0:y1, x0:x1], SAM).pixel_values
    assert torch.equal(seen[0], expected)


def test_block_reduced_planes_crop_the_raw_data_with_whole_plane_limits(tiny_session, big_image, monkeypatch):
    import napari_medplib.engine.image as image_module

    monkeypatch.setattr(image_module, "LARGE_SIDE", 400)  # 1100 px -> a 3x reduced view
    fake_decoder(tiny_session, monkeypatch)
    seen = []
    original = tiny_session.model.sam.encode_image
    monkeypatch.setattr(tiny_session.model.sam, "encode_image", lambda px: seen.append(px) or original(px))
    click = (150, 300)  # a 12-px disc: 4 px on the reduced plane, measured there, scaled back
    result = tiny_session.segment(big_image, points=[click])
    y0, x0, y1, x1 = result.window
    assert y1 - y0 == x1 - x0 < 400 and contains(result.window, *click, *click)  # a native-resolution crop
    limits = whole_plane_limits(big_image, False)
    assert abs(limits[1] - np.percentile(big_image, DEFAULT_PERCENTILES[1])) < 500  # the block is counted
    assert limits[1] > np.percentile(big_image[y0:y1, x0:x1], 99) + 1000  # not the crop's own range
    expected = prepare_sam_image(to_model_rgb(big_image[y0:y1, x0:x1], limits), SAM).pixel_values
    assert torch.equal(seen[0], expected)
    cy, cx = centroid(result.mask)
    assert abs(cy - click[0]) <= 4 and abs(cx - click[1]) <= 4


def test_a_second_click_in_the_same_window_reuses_the_embedding(tiny_session, big_image, count_calls):
    encode = count_calls(tiny_session.model.sam, "encode_image")
    first = tiny_session.segment(big_image, points=[(300, 450)])  # a 16-px disc
    second = tiny_session.segment(big_image, points=[(302, 448)], point_labels=[1])  # 3 px away on it
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
    # a click on image16's 30x40 block: its crop exceeds the small plane
    assert tiny_session.segment(image16, points=[(30, 50)]).window == (0, 0, *image16.shape)
    # big_image's 80x100 block: a 609-px crop, flush with the plane's top and right edges
    side = auto_side(box_extent((300, 850, 379, 949)), SAM, TARGET)
    assert side == 609
    assert tiny_session.segment(big_image, box=(300, 850, 379, 949)).window == (0, 1100 - side, side, 1100)


def test_window_none_matches_the_documented_whole_plane_pipeline(tiny_session, big_image):
    from napari_medplib.engine.image import low_res_to_masks, sam_prompt_coords

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


# ------------------------------------------------------------------------------------ flips (mirror voting)
#: (flip_y, flip_x) of the four views segment(flips=True) decodes.
FLIPS = {(False, False), (True, False), (False, True), (True, True)}


def flipped(array, flip_y: bool, flip_x: bool) -> np.ndarray:
    """``array`` mirrored top-bottom and/or left-right (written with np.flip, apart from window.unmirror)."""
    axes = tuple(a for a, f in ((0, flip_y), (1, flip_x)) if f)
    return np.flip(array, axes) if axes else np.asarray(array)


def flip_of(rgb, upright) -> tuple[bool, bool]:
    """Which mirror image of ``upright`` a decoded view's RGB is (noise content: exactly one matches)."""
    found = [f for f in sorted(FLIPS) if np.array_equal(rgb, flipped(upright, *f))]
    assert len(found) == 1, "a decoded view is one mirror image of the crop"
    return found[0]


def mirrored_yx(yx, hw, flip_y: bool, flip_x: bool) -> tuple[float, float]:
    y, x = yx
    return (hw[0] - 1 - y if flip_y else y, hw[1] - 1 - x if flip_x else x)


def record_views(session, monkeypatch):
    """Spy on the MedPLIB adapter's ``decode_view``: each decoded view's RGB, prompts (view pixels), masks and
    scores."""
    seen = []
    original = session.adapter.decode_view

    def spy(view, pts, labels, box_arr, prior, *args, **kwargs):
        masks, scores = original(view, pts, labels, box_arr, prior, *args, **kwargs)
        seen.append({"rgb": view.rgb, "points": pts, "box": box_arr, "prior": prior, "masks": masks,
                     "scores": scores})
        return masks, scores

    monkeypatch.setattr(session.adapter, "decode_view", spy)
    return seen


def numbered_scores(session, monkeypatch):
    """The (fake) decoder's IoU score becomes 1, 2, 3, ... per call, so averaging shows."""
    decode, count = session.model.sam.decode_with_prompts, iter(range(1, 1000))

    def numbered(*args, **kwargs):
        logits, _ = decode(*args, **kwargs)
        return logits, torch.full((1, 1), float(next(count)))

    monkeypatch.setattr(session.model.sam, "decode_with_prompts", numbered)


def prompt_centre(prompt) -> tuple[float, float]:
    """Where the fake decoder puts its mask: the click, or the box's centre (image pixels)."""
    if "points" in prompt:
        return tuple(float(v) for v in prompt["points"][0])
    y0, x0, y1, x1 = prompt["box"]
    return (y0 + y1) / 2, (x0 + x1) / 2


def check_mirror_views(seen, upright, prompt, origin) -> None:
    """Each of the four views got the prompt mirrored with it, and the fake's mask landed on it there."""
    hw = upright.shape[:2]
    centre = (prompt_centre(prompt)[0] - origin[0], prompt_centre(prompt)[1] - origin[1])  # view pixels
    pixel = max(hw) / SAM  # view pixels per SAM pixel
    assert len(seen) == 4 and {flip_of(v["rgb"], upright) for v in seen} == FLIPS
    for v in seen:
        flip = flip_of(v["rgb"], upright)
        where = mirrored_yx(centre, hw, *flip)
        if "points" in prompt:
            np.testing.assert_allclose(v["points"][0], where)
        else:  # corners mirrored and re-ordered (y0 <= y1, x0 <= x1)
            y0, x0, y1, x1 = (float(c) - o for c, o in zip(prompt["box"], (*origin, *origin), strict=True))
            a, b = mirrored_yx((y0, x0), hw, *flip), mirrored_yx((y1, x1), hw, *flip)
            np.testing.assert_allclose(v["box"], [min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])])
        mask = v["masks"][0]
        assert mask.shape == hw and mask[round(where[0]), round(where[1])], "the mask is on the mirrored prompt"
        cy, cx = centroid(mask)
        assert abs(cy - where[0]) <= 4 * pixel + 1 and abs(cx - where[1]) <= 4 * pixel + 1
        back = flipped(mask, *flip)  # the mask mapped back to the crop lands on the prompt there too
        assert back[round(centre[0]), round(centre[1])]


@pytest.mark.parametrize("prompt", [{"points": [(310, 700)]}, {"box": (300, 690, 320, 710)}])
def test_flips_map_the_prompt_into_each_mirror_image_of_the_crop_and_vote(tiny_session, big_image, monkeypatch,
                                                                           prompt):
    fake_decoder(tiny_session, monkeypatch)
    plain = tiny_session.segment(big_image, **prompt)
    numbered_scores(tiny_session, monkeypatch)
    seen = record_views(tiny_session, monkeypatch)
    result = tiny_session.segment(big_image, **prompt, flips=True)
    # the same crop (and SAM cache key) as without flips; four decodes of its mirror images
    assert result.window == plain.window and result.image_key == plain.image_key
    y0, x0, y1, x1 = result.window
    assert (y1 - y0, x1 - x0) != big_image.shape
    check_mirror_views(seen, to_model_rgb(big_image)[y0:y1, x0:x1], prompt, (y0, x0))
    # the vote: a full-size mask centred on the prompt in image pixels, nothing outside the crop
    assert result.mask.shape == big_image.shape and len(result.masks) == 1
    cy, cx = prompt_centre(prompt)
    assert result.mask[round(cy), round(cx)]
    my, mx = centroid(result.mask)
    pixel = (y1 - y0) / SAM
    assert abs(my - cy) <= 2 * pixel + 1 and abs(mx - cx) <= 2 * pixel + 1
    assert not result.mask[:y0].any() and not result.mask[y1:].any()
    assert not result.mask[:, :x0].any() and not result.mask[:, x1:].any()
    # pixels at least two of the four views hold: what each view's mask, mapped back, says
    votes = sum(flipped(v["masks"][0], *flip_of(v["rgb"], seen[0]["rgb"])).astype(int) for v in seen)
    np.testing.assert_array_equal(result.mask[y0:y1, x0:x1], votes >= 2)
    assert result.scores == [pytest.approx((1 + 2 + 3 + 4) / 4)]  # the four views' scores averaged


@pytest.mark.parametrize("prompt", [{"points": [(30, 50)]}, {"box": (22, 35, 47, 64)}])
def test_flips_on_the_whole_plane(tiny_session, image16, monkeypatch, prompt):
    """A non-square plane (SAM's frame padded): the prompt is mirrored in image pixels, the vote full size."""
    fake_decoder(tiny_session, monkeypatch)
    numbered_scores(tiny_session, monkeypatch)
    seen = record_views(tiny_session, monkeypatch)
    result = tiny_session.segment(image16, **prompt, window=None, flips=True)
    assert result.window == (0, 0, *image16.shape) and result.image_key == tiny_session.embed(image16)
    check_mirror_views(seen, to_model_rgb(image16), prompt, (0, 0))
    assert result.mask.shape == image16.shape
    cy, cx = prompt_centre(prompt)
    assert result.mask[round(cy), round(cx)]
    my, mx = centroid(result.mask)
    pixel = max(image16.shape) / SAM
    assert abs(my - cy) <= 2 * pixel + 1 and abs(mx - cx) <= 2 * pixel + 1
    assert result.scores == [pytest.approx(2.5)]


@pytest.mark.parametrize("prompt", [
    {"box": (2, 1070, 9, 1097)},  # 8 x 28 px in the top-right corner: its mirror images sit in the other corners
    {"points": [(0, 1099)], "window": 128},  # the corner pixel itself (on noise: an int window gives a crop)
    {"points": [(697, 3)]},  # near the bottom-left corner
])
def test_flips_cover_an_asymmetric_prompt_in_a_corner(tiny_session, big_image, monkeypatch, prompt):
    fake_decoder(tiny_session, monkeypatch)
    seen = record_views(tiny_session, monkeypatch)
    result = tiny_session.segment(big_image, **prompt, flips=True)
    y0, x0, y1, x1 = result.window
    assert (y1 - y0, x1 - x0) != big_image.shape  # a crop, flush with the corner
    assert y0 in (0, 700 - (y1 - y0)) and x0 in (0, 1100 - (x1 - x0))
    check_mirror_views(seen, to_model_rgb(big_image)[y0:y1, x0:x1], prompt, (y0, x0))
    cy, cx = prompt_centre(prompt)
    assert result.mask[round(cy), round(cx)], "the voted mask covers the prompt"
    if "box" in prompt:
        b0, b1, b2, b3 = prompt["box"]
        assert result.mask[b0 : b2 + 1, b1 : b3 + 1].sum() == result.mask.sum()  # clipped to the box
    my, mx = centroid(result.mask)
    pixel = (y1 - y0) / SAM
    assert abs(my - cy) <= 4 * pixel + 1 and abs(mx - cx) <= 4 * pixel + 1


def test_flips_mirror_a_mask_prior_too(tiny_session, big_image, monkeypatch):
    fake_decoder(tiny_session, monkeypatch)  # a mask-only prompt: the decoder echoes the (mirrored) prior
    seen = record_views(tiny_session, monkeypatch)
    prior = np.zeros(big_image.shape, bool)
    prior[600:640, 30:70] = True
    prior[600:610, 30:45] = False  # not symmetric
    result = tiny_session.segment(big_image, mask=prior, flips=True)
    y0, x0, y1, x1 = result.window
    upright = to_model_rgb(big_image)[y0:y1, x0:x1]
    assert len(seen) == 4 and {flip_of(v["rgb"], upright) for v in seen} == FLIPS
    for v in seen:
        np.testing.assert_array_equal(v["prior"], flipped(prior[y0:y1, x0:x1], *flip_of(v["rgb"], upright)))
    assert result.mask.shape == prior.shape
    assert (result.mask & prior).sum() / (result.mask | prior).sum() > 0.8


def test_flips_are_skipped_on_a_block_reduced_plane(tiny_session, big_image, monkeypatch):
    """Mirroring needs view pixels = image pixels; a reduced whole plane is decoded once, as without flips."""
    import napari_medplib.engine.image as image_module

    monkeypatch.setattr(image_module, "LARGE_SIDE", 400)
    fake_decoder(tiny_session, monkeypatch)
    seen = record_views(tiny_session, monkeypatch)
    plain = tiny_session.segment(big_image, points=[(310, 700)], window=None)
    flips = tiny_session.segment(big_image, points=[(310, 700)], window=None, flips=True)
    assert len(seen) == 2 and np.array_equal(plain.mask, flips.mask) and plain.scores == flips.scores


@pytest.mark.parametrize("flip_y", [False, True])
@pytest.mark.parametrize("flip_x", [False, True])
def test_mirror_prompts_and_unmirror_round_trip(flip_y, flip_x):
    rng = np.random.default_rng(4)
    view = make_view(rng.integers(0, 4000, (5, 7)).astype(np.uint16))
    points = np.array([[0.0, 0.0], [1.0, 5.0], [4.0, 6.0], [2.0, 3.0]])
    box = np.array([1.0, 2.0, 3.0, 6.0])
    prior = np.zeros((5, 7), bool)
    prior[1:3, 2:6] = True
    prior[4, 0] = True
    kept = points.copy(), box.copy(), prior.copy()
    mirrored, m_pts, m_box, m_prior = mirror_prompts(view, points, box, prior, flip_y, flip_x)
    # the view's RGB mirrored (a new content key unless nothing is flipped), same plane size and factor
    assert np.array_equal(mirrored.rgb, flipped(view.rgb, flip_y, flip_x))
    assert mirrored.image_hw == view.image_hw and mirrored.factor == view.factor == 1
    assert mirrored.key == content_key(mirrored.rgb) and (mirrored.key != view.key) == (flip_y or flip_x)
    # points: on the same content, at (h - 1 - y, w - 1 - x) where flipped
    for (y, x), (my, mx) in zip(points, m_pts, strict=True):
        assert (my, mx) == mirrored_yx((y, x), (5, 7), flip_y, flip_x)
        assert np.array_equal(view.rgb[int(y), int(x)], mirrored.rgb[int(my), int(mx)])
    # box: corners ordered again, covering exactly the mirrored pixels
    assert m_box[0] <= m_box[2] and m_box[1] <= m_box[3] and m_box.dtype == box.dtype

    def box_mask(b):
        mask = np.zeros((5, 7), bool)
        mask[int(b[0]) : int(b[2]) + 1, int(b[1]) : int(b[3]) + 1] = True
        return mask

    np.testing.assert_array_equal(box_mask(m_box), flipped(box_mask(box), flip_y, flip_x))
    np.testing.assert_array_equal(m_prior, flipped(prior, flip_y, flip_x))
    # the inputs are left as they were
    assert all(np.array_equal(a, b) for a, b in zip((points, box, prior), kept, strict=True))
    # mirroring is its own inverse: twice gives back the view and the prompts; unmirror undoes a mask
    view2, pts2, box2, prior2 = mirror_prompts(mirrored, m_pts, m_box, m_prior, flip_y, flip_x)
    assert np.array_equal(view2.rgb, view.rgb) and view2.key == view.key
    np.testing.assert_array_equal(pts2, points)
    np.testing.assert_array_equal(box2, box)
    np.testing.assert_array_equal(prior2, prior)
    back = unmirror(m_prior, flip_y, flip_x)
    np.testing.assert_array_equal(back, prior)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(unmirror(flipped(view.rgb[..., 0], flip_y, flip_x), flip_y, flip_x),
                                  view.rgb[..., 0])
    # absent prompts stay absent
    assert mirror_prompts(view, None, None, None, flip_y, flip_x)[1:] == (None, None, None)


def test_mirror_prompts_without_a_flip_changes_nothing():
    view = make_view(np.random.default_rng(5).integers(0, 255, (6, 9), dtype=np.uint8))
    points, box = np.array([[1.0, 2.0]]), np.array([0.0, 1.0, 4.0, 7.0])
    out = mirror_prompts(view, points, box, None, False, False)
    assert out[0] is view and out[1] is points and out[2] is box and out[3] is None
    mirrored = mirror_prompts(view, points, box, None, True, True)[0]
    assert not mirrored.rgb.flags.writeable and mirrored.rgb.flags.c_contiguous  # safe to cache


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


def test_cli_passes_the_window_to_the_session(tiny_model_folder, tiny_session, big_image, tmp_path, monkeypatch,
                                              capsys):
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
    side = clicked_side(tiny_session, big_image, (300, 450))
    assert [sides(r) for _, r in windows] == [(128, 128), (side, side), big_image.shape]


def test_an_adapted_models_known_object_extents_bound_the_click_crop():
    from napari_medplib.engine.scale import clamp_extent
    from napari_medplib.testing import tiny_session

    assert clamp_extent(5.0, []) == 5.0 and clamp_extent(None, []) is None
    assert clamp_extent(5.0, [20.0, 40.0]) == 20.0 and clamp_extent(90.0, [40.0, 20.0]) == 40.0
    assert clamp_extent(30.0, [20.0, 40.0]) == 30.0
    assert clamp_extent(None, [20.0, 80.0]) == pytest.approx(40.0)  # no estimate: their geometric middle
    yy, xx = np.mgrid[:400, :400]
    noisy = np.random.default_rng(0).normal(30, 5, (400, 400))
    noisy[(yy - 200) ** 2 + (xx - 200) ** 2 <= 8**2] += 150  # a 17-px disc
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    session = tiny_session()

    def extent():
        return session.adapter.clicked_extent(make_view(image), np.array([(200, 200)], float), np.array([1]))

    free = extent()
    assert free is not None and free < 60
    session.model.config.object_extent_range = [60.0, 90.0]  # adapted on objects 60-90 px long
    assert extent() == 60.0
