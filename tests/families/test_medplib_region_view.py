"""The region view: on a plane much larger than CLIP's input, a question about a small region pools the region
token from CLIP features of a crop around it; the image tokens and every small plane stay as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib import Region
from napari_medplib.engine import Session
from napari_medplib.engine.image import ModelView, make_view, region_grid_mask
from napari_medplib.engine.prompts import bind_regions
from napari_medplib.families.medplib import region_view
from napari_medplib.families.medplib.region_view import Crop, crop_mask, plan_crop
from napari_medplib.families.medplib.regions import encode_regions
from napari_medplib.model.preprocess import prepare_clip_image, region_mask_to_grid
from napari_medplib.testing import tiny_model

S = 336  # the tiny models' CLIP input, as the released model's


def _session(**overrides) -> Session:
    return Session.from_model(tiny_model(0, **overrides), name="tiny")


def _plane(side: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    plane = (rng.random((side, side)) * 200).astype(np.uint8)
    plane[side // 2 - 20 : side // 2 + 20, side // 2 - 20 : side // 2 + 20] = 255  # something to look at
    return plane


def _explicit_crop_patches(model, view: ModelView, crop: Crop) -> torch.Tensor:
    clip = prepare_clip_image(np.ascontiguousarray(view.rgb[crop.y0 : crop.y1, crop.x0 : crop.x1]), S)
    return model.encode_image(clip.pixel_values).patch_features


# ------------------------------------------------------------------------------------------- the rule
def test_the_rule_needs_a_plane_over_twice_the_input_and_a_small_box():
    box = (300, 300, 339, 339)  # 40 px
    assert plan_crop((2 * S, 2 * S), box, S) is None  # not larger than 2x the input: plane view
    assert plan_crop((2 * S + 1, 2 * S + 1), box, S) == Crop(152, 152, 488, 488)  # larger: a 336-px crop
    assert plan_crop((4 * S, 4 * S), box, S) == Crop(152, 152, 488, 488)  # 336 px around the box
    assert plan_crop((4096, 4096), None, S) is None  # no region pixels
    big = (1000, 1000, 1799, 1799)  # 800 px: a 2400-px crop is more than half of 4096
    assert plan_crop((4096, 4096), big, S) is None
    assert plan_crop((8192, 8192), big, S) == Crop(200, 200, 2600, 2600)  # 3x the box, centred
    # two boxes far apart make one large joint box: plane view
    session = _session()
    try:
        view = session.adapter.prepare_image(np.zeros((2048, 2048), np.uint8), None, None)
        apart = bind_regions([Region.box(10, 10, 40, 40), Region.box(1900, 1900, 1940, 1940)], view.image_hw)
        near = bind_regions([Region.box(1000, 1000, 1030, 1030), Region.box(1040, 1060, 1070, 1090)], view.image_hw)
        assert region_view.choose(session.adapter, apart, view) is None
        assert region_view.choose(session.adapter, near, view) == Crop(867, 877, 1203, 1213)
        session.adapter.region_view = "plane"
        assert region_view.choose(session.adapter, near, view) is None
        session.adapter.region_view = "closest"
        with pytest.raises(ValueError, match="region_view must be one of"):
            region_view.choose(session.adapter, near, view)
    finally:
        session.close()


# ------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("box, expected", [
    ((1000, 1000, 1059, 1059), Crop(862, 862, 1198, 1198)),  # centred on the box
    ((5, 10, 25, 30), Crop(0, 0, 336, 336)),  # shifted inside at the top-left edge
    ((2030, 2000, 2047, 2047), Crop(1712, 1712, 2048, 2048)),  # and at the bottom-right edge
])
def test_the_crop_holds_the_box_and_stays_inside_the_plane(box, expected):
    crop = plan_crop((2048, 2048), box, S)
    assert crop == expected
    assert crop.y0 <= box[0] and box[2] < crop.y1 and crop.x0 <= box[1] and box[3] < crop.x1


def test_a_plane_thinner_than_the_crop_gives_its_full_extent():
    crop = plan_crop((200, 3000), (50, 1400, 80, 1430), S)
    assert crop == Crop(0, 1247, 200, 1583) and crop.hw == (200, 336)


def test_boxes_are_mapped_to_crop_coordinates():
    view = make_view(np.zeros((2048, 2048), np.uint8))
    box = bind_regions([Region.box(1000, 1010, 1059, 1039)], view.image_hw)[0]
    crop = plan_crop(view.rgb.shape[:2], region_view.view_bbox([box], view), S)
    mask = crop_mask(box, view, crop)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == (1000 - crop.y0, 1010 - crop.x0, 1059 - crop.y0,
                                                                1039 - crop.x0)
    assert mask.sum() == 60 * 30


def test_crop_masks_are_the_plane_masks_cut_out_also_on_a_reduced_plane():
    """On a block-reduced view (factor 2) regions are in image pixels, the crop in view pixels."""
    rgb = np.zeros((1500, 1500, 3), np.uint8)
    view = ModelView(rgb, "reduced", (3000, 3000), 2)
    regions = bind_regions([Region.box(2000, 2100, 2090, 2150), Region.polygon([[2050, 2050], [2120, 2090],
                                                                                 [2010, 2130]]),
                            Region.point(2060, 2060)], view.image_hw)
    bbox = region_view.view_bbox(regions, view)
    assert bbox == (1000, 1020, 1060, 1075)  # image pixels // 2
    crop = plan_crop(rgb.shape[:2], bbox, S)
    for region in regions:
        expected = region_grid_mask(region, view)[crop.y0 : crop.y1, crop.x0 : crop.x1]
        assert expected.any() and np.array_equal(crop_mask(region, view, crop), expected)
    # a region sticking out of the crop keeps only its part inside
    edge = Crop(1020, crop.x0, crop.y1, crop.x1)  # the box spans view rows 1000..1045
    cut = crop_mask(regions[0], view, edge)
    assert np.array_equal(cut, region_grid_mask(regions[0], view)[edge.y0 : edge.y1, edge.x0 : edge.x1])
    assert cut.sum() < crop_mask(regions[0], view, crop).sum()


# ------------------------------------------------------------------------------------------- small planes
@pytest.mark.parametrize("side", [256, 2 * S])
def test_small_planes_give_identical_inputs_and_answers(side):
    image = _plane(side)
    question, box = "What is in <region>?", [Region.box(side // 2 - 10, side // 2 - 10, side // 2 + 10, side // 2 + 10)]
    replies, inputs = {}, {}
    for mode in ("auto", "plane"):
        session = _session()
        try:
            session.adapter.region_view = mode
            replies[mode] = session.ask(image, question, box, max_new_tokens=6)
            view = session.adapter.prepare_image(image, None, None)
            read = encode_regions(session.adapter, bind_regions(box, view.image_hw), view, [0])
            plane = session.adapter.caches.features.get(("clip", view.key))
            assert session.adapter.clip_features(view) is plane  # the plane's own features, untouched
            inputs[mode] = read.region_masks[0].numpy()
        finally:
            session.close()
    assert replies["auto"].token_ids == replies["plane"].token_ids and replies["auto"].text == replies["plane"].text
    assert np.array_equal(inputs["auto"], inputs["plane"])


# ------------------------------------------------------------------------------------------- large planes
@pytest.mark.parametrize("overrides", [{}, {"region_geometry": True, "region_geometry_version": 3}],
                         ids=["reference", "geometry-v3"])
def test_on_a_large_plane_region_tokens_come_from_the_crop(overrides):
    session = _session(**overrides)
    family, model = session.adapter, session.model
    try:
        image = _plane(2048)
        view = family.prepare_image(image, None, None)
        regions = bind_regions([Region.box(1000, 1000, 1040, 1040)], view.image_hw)
        with torch.inference_mode():
            plane = family.clip_features(view)
            read = encode_regions(family, regions, view, [0])
            crop = region_view.choose(family, regions, view)
            assert read.crop == crop
            used = region_view.with_crop(family, view, read.crop, plane)  # what generation gives the decoder
            again = family.clip_features(view)  # the plane's own, untouched
            explicit = _explicit_crop_patches(model, view, crop)
            assert torch.equal(used.patch_features, explicit)
            assert torch.equal(used.image_tokens, plane.image_tokens)  # the model still sees the whole plane
            assert again is plane
            mask = region_mask_to_grid(crop_mask(regions[0], view, crop), S, 14).mask_336
            assert np.array_equal(read.region_masks[0][0].numpy(), mask)
            brightness = None
            if model.regions_read_brightness:
                from napari_medplib.model.preprocess import frame_brightness

                clip = prepare_clip_image(np.ascontiguousarray(view.rgb[crop.y0 : crop.y1, crop.x0 : crop.x1]), S)
                brightness = frame_brightness(clip)
                assert torch.equal(used.brightness[0], brightness)
            tokens, _ = model.encode_regions(used.patch_features[0], read.region_masks[0], None, None,
                                             used.brightness[0] if used.brightness is not None else None)
            by_hand, _ = model.encode_regions(explicit[0], torch.from_numpy(mask)[None], None, None, brightness)
            squeezed_masks = region_mask_to_grid(region_grid_mask(regions[0], view), S, 14).mask_336
            squeezed, _ = model.encode_regions(plane.patch_features[0], torch.from_numpy(squeezed_masks)[None], None,
                                               None, plane.brightness[0] if plane.brightness is not None else None)
        assert torch.equal(tokens, by_hand)
        assert not torch.allclose(tokens, squeezed, atol=1e-3)
        assert ("clip-region", view.key, crop.box, (1,), S) in family.caches.features  # cached with the crop
    finally:
        session.close()


def test_several_scales_stitch_tiles_into_one_grid_of_the_same_width():
    session = _session()
    family, model = session.adapter, session.model
    try:
        view = family.prepare_image(_plane(2048), None, None)
        crop = Crop(900, 900, 1236, 1236)
        family.region_scales = (1, 2)
        with torch.inference_mode():
            both = region_view.crop_features(family, view, crop).patch_features
            rgb = np.ascontiguousarray(view.rgb[900:1236, 900:1236])
            one = _explicit_crop_patches(model, view, crop)
            big = prepare_clip_image(rgb, 2 * S).pixel_values  # [1, 3, 672, 672]
            quarters = [model.encode_image(big[..., r : r + S, c : c + S]).patch_features for r in (0, S) for c in (0, S)]
        grids = [q[0].T.reshape(-1, 24, 24) for q in quarters]  # [Dv, 24, 24] each, row-major tiles
        stitched = torch.cat([torch.cat(grids[:2], -1), torch.cat(grids[2:], -1)], -2)  # [Dv, 48, 48]
        pooled = stitched.reshape(-1, 24, 2, 24, 2).mean(dim=(2, 4)).flatten(1).T  # [576, Dv]
        assert both.shape == one.shape  # same grid, same width: what the region encoder was trained on
        torch.testing.assert_close(both[0], (one[0] + pooled) / 2, rtol=1e-5, atol=1e-5)
    finally:
        session.close()


def test_asking_about_a_small_box_on_a_2048_plane(monkeypatch):
    """End to end: the region encoder gets the crop's features and sees a box the squeezed plane loses."""
    image = _plane(2048)
    box = [Region.box(960, 960, 989, 989)]  # 30 px: ~5 px of the 336-px frame, between its grid cells
    seen: dict[str, list] = {}
    replies = {}
    for mode in ("plane", "auto"):
        session = _session()
        calls = seen[mode] = []
        original = session.model.encode_regions

        def spy(patch_features, region_masks, *args, _original=original, _calls=calls, **kwargs):
            _calls.append(patch_features.clone())
            return _original(patch_features, region_masks, *args, **kwargs)

        monkeypatch.setattr(session.model, "encode_regions", spy)
        try:
            session.adapter.region_view = mode
            replies[mode] = session.ask(image, "What is in <region>?", box, max_new_tokens=4)
            view = session.adapter.prepare_image(image, None, None)
            plane = session.adapter.caches.features.get(("clip", view.key)).patch_features[0]
            if mode == "auto":
                crop = region_view.choose(session.adapter, bind_regions(box, view.image_hw), view)
                with torch.inference_mode():
                    assert torch.equal(calls[0], _explicit_crop_patches(session.model, view, crop)[0])
            else:
                assert torch.equal(calls[0], plane)
        finally:
            session.close()
    assert len(seen["plane"]) == len(seen["auto"]) == 1
    assert replies["plane"].empty_regions == [0] and replies["plane"].warnings  # too small for the plane's grid
    assert replies["auto"].empty_regions == [] and not replies["auto"].warnings
    assert replies["auto"].finish_reason in ("eos", "max_new_tokens", "stop_string")


def test_ask_planes_reads_the_same_crops_as_ask(monkeypatch):
    planes = [_plane(2048, seed=1), _plane(2048, seed=2), _plane(256, seed=3)]
    box = [Region.box(100, 100, 129, 129)]
    session = _session(region_geometry=True, region_geometry_version=3)
    seen: list[torch.Tensor] = []
    original = session.model.region_encoder.forward

    def spy(patch_features, *args, **kwargs):
        seen.append(patch_features.clone())
        return original(patch_features, *args, **kwargs)

    monkeypatch.setattr(session.model.region_encoder, "forward", spy)
    try:
        batched = session.ask_planes(planes, "What is in <region>?", box, batch_size=3, max_new_tokens=4)
        one_by_one = [session.ask(p, "What is in <region>?", box, max_new_tokens=4) for p in planes]
    finally:
        session.close()
    assert [r.token_ids for r in batched] == [r.token_ids for r in one_by_one]
    assert [r.empty_regions for r in batched] == [r.empty_regions for r in one_by_one]
    assert len(seen) == 6
    for b in range(3):  # the batch's region encoder calls read what ask's did, plane by plane
        torch.testing.assert_close(seen[b], seen[3 + b], rtol=1e-5, atol=1e-5)
