"""A click's mask keeps only its pieces under a positive click (``Session.segment(clicked_pieces=True)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.engine.prompts import keep_clicked_pieces


def two_blobs(shape=(20, 30)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[2:8, 2:8] = True  # piece A
    mask[10:18, 15:28] = True  # piece B
    mask[8, 8] = True  # touches A diagonally: 8-connected, so part of A
    return mask


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_only_the_clicked_piece_is_kept(kind):
    mask = two_blobs()
    given = torch.from_numpy(mask) if kind == "torch" else mask
    kept = keep_clicked_pieces(given, np.array([[4.2, 4.6]]), np.array([1]))
    assert isinstance(kept, type(given))
    kept = np.asarray(kept)
    expected = np.zeros_like(mask)
    expected[2:8, 2:8] = True
    expected[8, 8] = True
    assert (kept == expected).all()
    assert np.asarray(given).sum() == mask.sum()  # the input is not changed


def test_clicks_on_both_pieces_keep_both_and_negative_clicks_do_not_count():
    mask = two_blobs()
    both = keep_clicked_pieces(mask, np.array([[4, 4], [12, 20]]), np.array([1, 1]))
    assert (both == mask).all()
    only_b = keep_clicked_pieces(mask, np.array([[4, 4], [12, 20]]), np.array([0, 1]))
    assert only_b[12, 20] and not only_b[4, 4]


@pytest.mark.parametrize(("points", "labels"), [([[0, 29]], [1]), ([[4, 4]], [0]), (None, None)])
def test_a_mask_no_positive_click_falls_in_is_left_as_it_is(points, labels):
    mask = two_blobs()
    kept = keep_clicked_pieces(mask, None if points is None else np.array(points),
                               None if labels is None else np.array(labels))
    assert (np.asarray(kept) == mask).all()
    empty = np.zeros((5, 5), bool)
    assert not keep_clicked_pieces(empty, np.array([[2, 2]]), np.array([1])).any()


def paint_two_pieces(session, monkeypatch):
    """SAM's decoder says "object" on two separate bands of the 64x64 map (left and right quarters)."""

    def decode(embeddings, points=None, point_labels=None, boxes=None, mask_inputs=None, multimask_output=False):
        k = 3 if multimask_output else 1
        logits = torch.full((1, k, 64, 64), -10.0)
        logits[..., 4:60, 2:14] = 10.0
        logits[..., 4:60, 50:62] = 10.0
        return logits, torch.ones(1, k)

    monkeypatch.setattr(session.model.sam, "decode_with_prompts", decode)


@pytest.mark.parametrize("multimask", [False, True])
def test_segment_keeps_the_clicked_piece_unless_asked(tiny_session, monkeypatch, multimask):
    paint_two_pieces(tiny_session, monkeypatch)  # on the whole plane (window=None): the fake paints its halves
    image = (np.random.default_rng(1).random((128, 128)) * 3000).astype(np.uint16)
    raw = tiny_session.segment(image, points=[(64, 16)], multimask=multimask, clicked_pieces=False, window=None)
    left, right = raw.mask[:, :64], raw.mask[:, 64:]
    assert left.any() and right.any()  # both pieces, else this test could not tell the two apart
    result = tiny_session.segment(image, points=[(64, 16)], multimask=multimask, window=None)
    for mask in result.masks:
        assert (mask[:, :64] == left).all() and not mask[:, 64:].any()
    on_right = tiny_session.segment(image, points=[(64, 16), (64, 112)], point_labels=[0, 1], window=None).mask
    assert on_right[:, 64:].any() and not on_right[:, :64].any()
    boxed = tiny_session.segment(image, box=(0, 0, 127, 127), window=None)  # a box alone is not a click
    assert boxed.mask[:, :64].any() and boxed.mask[:, 64:].any()
