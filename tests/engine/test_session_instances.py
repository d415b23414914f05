"""Session.ask(..., instances=True): one label per object per <SEG>, per-object tables, measured counts.

The tiny random model cannot ground or split anything real, so the counting tests give it an oracle: its
grounding returns the true mask and its SAM's point prompts return the object under the point.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import force_seg
from test_instances import CENTRES, TRUTH, oracle_logits

from napari_medplib import Region
from napari_medplib.engine.measure import COLUMNS


def test_every_seg_gets_instances_and_a_table(tiny_session, image16):
    handle = force_seg(tiny_session.model)
    try:
        reply = tiny_session.ask(image16, "Please segment the nuclei.", max_new_tokens=2)
        plain = tiny_session.ask(image16, "Please segment the nuclei.", max_new_tokens=2, instances=False)
    finally:
        handle.remove()
    assert len(reply.masks) == 2 and len(reply.instances) == 2 and len(reply.tables) == 2
    for mask, labels, table in zip(reply.masks, reply.instances, reply.tables, strict=True):
        assert labels.dtype == np.int32 and labels.shape == image16.shape
        assert not labels[~mask].any()  # objects lie inside the semantic mask
        ids = np.unique(labels[labels > 0])
        assert ids.tolist() == list(range(1, len(ids) + 1))
        assert tuple(table) == COLUMNS and table["label"].tolist() == ids.tolist()
    assert "instances" in reply.timings and reply.measured_count is None and reply.count_noun is None
    assert plain.instances == [] and plain.tables == [] and len(plain.masks) == 2


@pytest.fixture
def oracle(tiny_session, monkeypatch):
    """The tiny session with an oracle grounding (the true mask) and an oracle SAM point decoder."""
    import torch

    sam = tiny_session.model.sam

    def ground(seg_hidden, view, mask_mode, on_progress, regions=()):
        return [TRUTH > 0 for _ in range(seg_hidden.shape[0])], [1.0] * seg_hidden.shape[0]

    def decode_with_prompts(image_embeddings, points=None, point_labels=None, **_):
        xy = np.asarray(points)[:, 0]  # the image is 256 x 256: SAM's frame is the image
        logits = oracle_logits(xy[:, ::-1] - 0.5, TRUTH)
        return torch.from_numpy(logits)[:, None], torch.ones(len(xy), 1)

    import napari_medplib.engine.instance_grounding as grounding

    monkeypatch.setattr(grounding, "object_diameter", lambda view: 20.0)  # the discs' size: no tiles
    monkeypatch.setattr(tiny_session.adapter, "ground", ground)
    monkeypatch.setattr(sam, "decode_with_prompts", decode_with_prompts)
    handle = force_seg(tiny_session.model)
    yield tiny_session
    handle.remove()


def test_how_many_question_reports_the_measured_count(oracle):
    image = (TRUTH > 0).astype(np.float32) * 200 + 10
    reply = oracle.ask(image, "How many nuclei are in this image?", max_new_tokens=1)
    assert reply.count_noun == "nuclei"
    assert reply.measured_count == len(CENTRES)
    assert reply.count_labels.max() == len(CENTRES) and "count" in reply.timings
    # the split instances of the answer's own <SEG> are the same objects
    assert reply.instances[0].max() == len(CENTRES)
    # the answer states the measured count; the model's own words are kept beside it
    assert reply.text.startswith(f"{len(CENTRES)} nuclei") and reply.model_text is not None


def test_how_many_in_a_region_counts_the_objects_centred_in_it(oracle):
    image = (TRUTH > 0).astype(np.float32) * 200 + 10
    region = Region.box(20, 20, 130, 90)  # holds discs 1-4
    reply = oracle.ask(image, "How many nuclei are in <region>?", [region], max_new_tokens=1)
    assert reply.measured_count == 4


def test_no_count_without_a_how_many_question_or_with_instances_off(oracle):
    image = (TRUTH > 0).astype(np.float32)
    assert oracle.ask(image, "What is this?", max_new_tokens=1).measured_count is None
    assert oracle.ask(image, "How many nuclei are there?", max_new_tokens=1, instances=False).measured_count is None


def test_segment_result_has_a_one_row_table(tiny_session, image16):
    result = tiny_session.segment(image16, box=(20, 30, 49, 69))
    if result.mask.any():
        assert result.table["label"].tolist() == [1] and result.table["area"][0] == result.mask.sum()
    else:
        assert len(result.table["label"]) == 0


def test_plan_tiles_puts_objects_at_the_models_scale():
    from napari_medplib.engine.instance_grounding import plan_tiles
    from napari_medplib.engine.scale import MODEL_OBJECT_DIAMETER

    assert plan_tiles((256, 256), 18.0, 256) is None  # already at the model's scale
    assert plan_tiles((2048, 2048), 150.0, 256) is None  # objects as large as a whole-plane view shows them
    side, overlap = plan_tiles((1024, 1024), MODEL_OBJECT_DIAMETER, 256)
    assert side == 256 and MODEL_OBJECT_DIAMETER * 1.5 <= overlap <= side // 2
    side, _ = plan_tiles((1024, 1024), MODEL_OBJECT_DIAMETER / 2, 256)
    assert side == 128  # objects half the model's size: tiles half as large, shown twice as large
    assert plan_tiles((1024, 1024), None, 256) is None


def test_the_tile_calibration_follows_the_size_estimator():
    """MODEL_ESTIMATED_DIAMETER is what the estimator reads on the model's training frames: re-measure it
    (and update the constant) when ``scale.estimate_object_diameter`` changes."""
    from napari_medplib.engine.instance_grounding import MODEL_ESTIMATED_DIAMETER
    from napari_medplib.engine.scale import estimate_object_diameter, gray_plane
    from napari_medplib.imaging import to_model_rgb
    from napari_medplib.train.synth import make_sample

    readings = [estimate_object_diameter(gray_plane(to_model_rgb(make_sample("nuclei", 1000 + s).image)))
                for s in range(8)]
    assert np.median(readings) == pytest.approx(MODEL_ESTIMATED_DIAMETER, rel=0.25)
