"""The wire format: arrays, regions and replies survive a JSON round trip exactly; no pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medplib.engine import Reply
from napari_medplib.engine.window import WindowedSegmentResult
from napari_medplib.regions import Region
from napari_medplib.serve.wire import (
    WireError,
    image_id,
    pack_array,
    pack_region,
    pack_reply,
    pack_segment,
    unpack_array,
    unpack_region,
    unpack_reply,
    unpack_segment,
    wire_image,
)


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).random((37, 51)) > 0.5,
    np.arange(12, dtype=">i4").reshape(3, 4),  # big-endian in, same values out
    np.arange(6, dtype=np.float64),
    np.zeros((0, 3), np.int32),
])
def test_array_round_trip(array):
    packed = json.loads(json.dumps(pack_array(array)))
    out = unpack_array(packed)
    assert out.shape == array.shape and out.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(out, array)


def test_masks_travel_small():
    mask = np.zeros((512, 512), bool)
    yy, xx = np.mgrid[:512, :512]
    mask[(yy - 256) ** 2 + (xx - 200) ** 2 < 100**2] = True  # ~31,000 pixels
    assert len(json.dumps(pack_array(mask))) < 4_000


def test_bad_arrays_are_refused():
    good = pack_array(np.ones((4, 4), np.uint8))
    for bad in ({**good, "dtype": "|O"}, {**good, "shape": [5, 5]}, {**good, "shape": [-1]},
                {**good, "data": "%%%"}, "nope", {**good, "shape": [2**20, 2**20]}):
        with pytest.raises(WireError):
            unpack_array(bad)


def test_image_id_depends_on_dtype_shape_and_bytes():
    a = wire_image(np.arange(12, dtype=np.uint16).reshape(3, 4))
    assert image_id(a) == image_id(wire_image(a.copy()))
    assert image_id(a) != image_id(wire_image(a.reshape(4, 3)))
    assert image_id(a) != image_id(wire_image(a.astype(np.int16)))
    assert image_id(wire_image(a.astype(">u2"))) == image_id(a)
    with pytest.raises(ValueError):
        wire_image(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError):
        wire_image(np.array([["a"]], dtype=object))


def test_regions_round_trip():
    mask = np.zeros((30, 40), bool)
    mask[5:9, 7:20] = True
    regions = [Region.point(3, 4, positive=False, label="bg", source="pts", index=2),
               Region.box(1, 2, 10, 12, image_shape=(30, 40)), Region.polygon([[0, 0], [10, 0], [10, 10]]),
               Region.path([[1, 1], [5, 9]]), Region.mask(mask)]
    for region in regions:
        out = unpack_region(json.loads(json.dumps(pack_region(region))))
        assert (out.kind, out.label, out.positive, out.source, out.index, out.image_shape) == (
            region.kind, region.label, region.positive, region.source, region.index, region.image_shape)
        np.testing.assert_array_equal(out.to_mask((30, 40)), region.to_mask((30, 40)))


def test_reply_and_segment_round_trip():
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:9] = True
    labels = mask.astype(np.int32)
    table = {"label": np.array([1]), "area": np.array([36.0])}
    reply = Reply(text="Sure, <SEG>.", masks=[mask], regions=[Region.box(1, 1, 5, 5)], question="Where?",
                  model="m", finish_reason="eos", timings={"total": 0.5}, expert_share=[[0.5, 0.5]],
                  expert_share_mean=[0.5, 0.5], warnings=["w"], empty_regions=[0], mask_scores=[0.9],
                  token_ids=[1, 2], image_key="k", instances=[labels], tables=[table], measured_count=1,
                  count_noun="cell", count_labels=labels)
    out = unpack_reply(json.loads(json.dumps(pack_reply(reply))))
    assert out.text == reply.text and out.measured_count == 1 and out.count_noun == "cell"
    np.testing.assert_array_equal(out.masks[0], mask)
    np.testing.assert_array_equal(out.instances[0], labels)
    np.testing.assert_array_equal(out.count_labels, labels)
    np.testing.assert_array_equal(out.tables[0]["area"], table["area"])
    result = WindowedSegmentResult(mask, [~mask, mask], [0.1, 0.9], {"total": 0.1}, "k", table=table,
                                   window=(0, 0, 20, 30))
    back = unpack_segment(json.loads(json.dumps(pack_segment(result))))
    np.testing.assert_array_equal(back.mask, mask)
    assert back.scores == [0.1, 0.9] and back.window == (0, 0, 20, 30) and back.masks[1] is back.mask


def test_no_pickle_anywhere():
    from pathlib import Path

    import napari_medplib.serve as serve

    for source in Path(serve.__file__).parent.glob("*.py"):
        text = source.read_text()
        assert "pickle" not in text.replace("never pickle", "").replace("no pickle", "").replace(
            "not pickle", ""), source.name
