"""Caches, asserted by call counts: features, SAM embeddings, prefix KV, LRU bound, disk files."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from engine_helpers import force_seg

from napari_medplib import Region
from napari_medplib.engine import EmbeddingCacheMismatchError, Session
from napari_medplib.testing import tiny_model


def test_second_question_skips_both_encoders_and_the_prefill(tiny_session, image16, count_calls):
    model = tiny_session.model
    clip = count_calls(model, "encode_image")
    sam = count_calls(model.sam, "encode_image")
    prefill = count_calls(model, "prefill")
    handle = force_seg(model)
    try:
        first = tiny_session.ask(image16, "Segment the cell.", max_new_tokens=1)
        assert (clip.calls, sam.calls, prefill.calls) == (1, 1, 1)
        second = tiny_session.ask(image16, "Segment the nucleus in <region>.", [Region.box(5, 5, 50, 50)], max_new_tokens=1)
        assert (clip.calls, sam.calls, prefill.calls) == (1, 1, 1)
        assert second.timings["prefill"] == 0.0 and len(second.masks) == 1
        # a copy of the image is the same content: still no encoder run
        tiny_session.ask(image16.copy(), "What is it?", max_new_tokens=1)
        assert (clip.calls, sam.calls, prefill.calls) == (1, 1, 1)
        # another image, and an explicit clear, recompute
        tiny_session.ask(image16[::-1], "Segment it.", max_new_tokens=1)
        assert (clip.calls, sam.calls, prefill.calls) == (2, 2, 2)
        tiny_session.clear_cache()
        tiny_session.ask(image16, "Segment it.", max_new_tokens=1)
        assert (clip.calls, sam.calls, prefill.calls) == (3, 3, 3)
    finally:
        handle.remove()
    assert first.image_key == second.image_key


def test_prefix_reuse_gives_the_same_logits_and_ids_as_a_cold_run(image16, monkeypatch):
    session = Session.from_model(tiny_model(), name="tiny")
    model = session.model
    results = []
    original = model.generate

    @functools.wraps(original)
    def capture(*args, **kwargs):
        result = original(*args, return_step_logits=True, **kwargs)
        results.append((result, kwargs.get("prefix")))
        return result

    monkeypatch.setattr(model, "generate", capture)
    regions = [Region.box(10, 10, 60, 70), Region.point(70, 100)]
    session.ask(image16, "What is this?", max_new_tokens=2)  # fills the prefix cache
    warm = session.ask(image16, "Compare <region1> with <region2>.", regions, max_new_tokens=6)
    session.clear_cache()
    cold = session.ask(image16, "Compare <region1> with <region2>.", regions, max_new_tokens=6)
    (warm_result, warm_prefix), (cold_result, cold_prefix) = results[1], results[2]
    assert warm_prefix is results[0][1] is not None  # the warm run reused the cached prefix object
    assert cold_prefix is not warm_prefix
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    torch.testing.assert_close(warm_result.step_logits, cold_result.step_logits, atol=1e-5, rtol=1e-5)
    # and both equal a run without any prefix cache at all
    from napari_medplib.model.tokenizer import encode_question

    ids, order = encode_question(model.tokenizer, "Compare <region1> with <region2>.", 2, session.template)
    from napari_medplib.engine.prompts import bind_regions
    from napari_medplib.families.medplib.regions import region_masks

    view = session.adapter.prepare_image(image16, None, None)
    grids, _ = region_masks(session.adapter, bind_regions(regions, image16.shape), view)
    features = session.adapter.clip_features(view, None)
    plain = original(torch.tensor(ids), region_masks=[grids[order]], image_features=features, max_new_tokens=6,
                     stop_strings=("</s>",), return_step_logits=True)
    assert plain.ids == warm_result.ids
    torch.testing.assert_close(plain.step_logits, warm_result.step_logits, atol=1e-5, rtol=1e-5)


def test_warm_segment_runs_only_the_mask_decoder(tiny_session, image16, count_calls):
    sam = tiny_session.model.sam
    encoder = count_calls(sam, "encode_image")
    decoder_calls = []
    hook = sam.mask_decoder.register_forward_hook(lambda *a: decoder_calls.append(1))
    clip = count_calls(tiny_session.model, "encode_image")
    try:
        first = tiny_session.segment(image16, points=[(30, 40)], point_labels=[1])
        assert (encoder.calls, len(decoder_calls)) == (1, 1)
        second = tiny_session.segment(image16, points=[(30, 40), (80, 10)], point_labels=[1, 0])
        assert (encoder.calls, len(decoder_calls)) == (1, 3)  # a negative click: its object is decoded too
        third = tiny_session.segment(image16, box=(10, 20, 60, 90), multimask=True)
        assert (encoder.calls, len(decoder_calls)) == (1, 4)
        assert clip.calls == 0  # no LLM side at all
    finally:
        hook.remove()
    assert first.mask.shape == second.mask.shape == image16.shape
    assert len(third.masks) == len(third.scores) == 3
    assert np.array_equal(third.mask, third.masks[int(np.argmax(third.scores))])
    # an ask() after segment() reuses the SAM embedding for grounding
    handle = force_seg(tiny_session.model)
    try:
        tiny_session.ask(image16, "Segment it.", max_new_tokens=1)
    finally:
        handle.remove()
    assert encoder.calls == 1


def test_feature_cache_is_bounded(image16, count_calls):
    session = Session.from_model(tiny_model(), name="tiny", feature_cache_bytes=1)  # nothing fits
    clip = count_calls(session.model, "encode_image")
    session.ask(image16, "What?", max_new_tokens=1)
    session.ask(image16, "What?", max_new_tokens=1)
    assert clip.calls == 2
    session = Session.from_model(tiny_model(), name="tiny", prefix_cache_items=1)
    prefill = count_calls(session.model, "prefill")
    for img in (image16, image16[::-1], image16):
        session.ask(img, "What?", max_new_tokens=1)
    assert prefill.calls == 3 and session.cache_info()["prefixes"]["entries"] == 1
    assert session.cache_info()["prefixes"]["evictions"] == 2


def test_disk_cache_is_reused_and_a_mismatch_is_refused(tmp_path, image16, count_calls):
    folder = tmp_path / "embeddings"
    first = Session.from_model(tiny_model(), name="tiny", embedding_cache_dir=folder)
    key = first.embed(image16)
    files = list(folder.glob("*.safetensors"))
    assert [f.stem for f in files] == [key]
    reference = first.segment(image16, points=[(40, 60)])

    second = Session.from_model(tiny_model(), name="tiny", embedding_cache_dir=folder)
    clip = count_calls(second.model, "encode_image")
    sam = count_calls(second.model.sam, "encode_image")
    again = second.segment(image16, points=[(40, 60)])
    second.ask(image16, "What?", max_new_tokens=1)
    assert (clip.calls, sam.calls) == (0, 0)
    np.testing.assert_array_equal(again.mask, reference.mask)

    other_model = Session.from_model(tiny_model(seed=5), name="tiny", embedding_cache_dir=folder)
    with pytest.raises(EmbeddingCacheMismatchError, match="model_hash"):
        other_model.segment(image16, points=[(40, 60)])
    bf16 = Session.from_model(tiny_model().cast("bfloat16"), name="tiny", fingerprint=first.fingerprint,
                              embedding_cache_dir=folder)
    with pytest.raises(EmbeddingCacheMismatchError, match="dtype"):
        bf16.ask(image16, "What?", max_new_tokens=1)
    (folder / f"{key}.safetensors").write_bytes(b"garbage")
    with pytest.raises(EmbeddingCacheMismatchError, match="not a readable"):
        second.clear_cache() or second.segment(image16, points=[(40, 60)])


def test_repeated_clicks_on_a_plane_skip_the_contrast_mapping(tiny_session, image16, monkeypatch):
    from napari_medplib.families.medplib import features as features_module

    calls = []
    original = features_module.make_view
    monkeypatch.setattr(features_module, "make_view", lambda *a, **k: calls.append(1) or original(*a, **k))
    a = tiny_session.segment(image16, points=[(10, 10)])
    b = tiny_session.segment(image16.copy(), points=[(20, 20)])
    assert len(calls) == 1 and a.image_key == b.image_key
    tiny_session.segment(image16, points=[(10, 10)], contrast_limits=(0, 4000))  # other contrast: new view
    edited = image16.copy()
    edited[0, 0] += 1
    tiny_session.segment(edited, points=[(10, 10)])  # other content: new view
    assert len(calls) == 3


def test_a_counting_model_answers_the_same_from_the_disk_cache(tmp_path, image16):
    """The disk cache keeps the image tokens (count tokens included); the object centres that region
    tokens read are found again, so a box question gets the same answer as with fresh features."""
    def counting_model():
        model = tiny_model(count_nouns=["cells", "nuclei"])
        with torch.no_grad():
            model.counter.region_count_embed.normal_(generator=torch.Generator().manual_seed(3))
            model.counter.head[-1].bias.fill_(0.0)  # some centres above 0.5 in a random image
        return model

    folder = tmp_path / "embeddings"
    box = [Region.box(2, 2, 14, 14)]
    first = Session.from_model(counting_model(), name="tiny", embedding_cache_dir=folder)
    reference = first.ask(image16, "How many nuclei are in <region>?", box, max_new_tokens=4)
    second = Session.from_model(counting_model(), name="tiny", fingerprint=first.fingerprint,
                                embedding_cache_dir=folder)
    again = second.ask(image16, "How many nuclei are in <region>?", box, max_new_tokens=4)
    assert again.token_ids == reference.token_ids
    [key] = [k for k in second._features.keys() if k[0] == "clip"]
    features = second._features.get(key)
    assert features.count_peaks is not None and features.count_peaks.any()
