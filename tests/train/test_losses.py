"""Training losses and the Dice metric on inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_medplib.train.losses import (
    dice_score,
    iou_mse,
    mask_bce,
    mask_dice,
    mask_losses,
    token_ce,
)


def test_token_ce_is_shifted_and_ignores_masked_labels():
    vocab = 5
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1, 3] = 10.0  # position 1 predicts label at position 2
    labels = torch.tensor([[-100, -100, 3, -100]])
    assert token_ce(logits, labels).item() == pytest.approx(F.cross_entropy(logits[0, 1:2], torch.tensor([3])).item())
    assert token_ce(logits, labels).item() < 1e-3
    wrong = torch.tensor([[-100, 3, -100, -100]])  # predicted by position 0 (uniform logits)
    assert token_ce(logits, wrong).item() == pytest.approx(math.log(vocab), rel=1e-5)


def test_token_ce_without_labels_is_zero_with_a_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = token_ce(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_dice_loss_and_bce_on_known_masks():
    target = torch.zeros(1, 8, 8)
    target[0, :4] = 1
    perfect = (target * 2 - 1) * 50  # confident and right
    assert mask_dice(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_bce(perfect, target).item() < 1e-6
    inverted = -perfect
    assert mask_dice(inverted, target).item() == pytest.approx(1.0, abs=1e-6)
    zero = torch.zeros(1, 8, 8)  # p = 0.5 everywhere
    assert mask_bce(zero, target).item() == pytest.approx(math.log(2), rel=1e-6)
    assert mask_dice(zero, target).item() == pytest.approx(1 - 2 * (32 * 0.5) / (64 * 0.5 + 32), rel=1e-5)


def test_mask_losses_weight_groups_by_mask_count():
    t1, t2 = torch.ones(1, 4, 4), torch.zeros(3, 2, 2)
    l1, l2 = torch.zeros(1, 4, 4), torch.full((3, 2, 2), 3.0)
    bce, _ = mask_losses([l1, l2], [t1, t2])
    expected = (mask_bce(l1, t1) * 1 + mask_bce(l2, t2) * 3) / 4
    assert bce.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="one target per mask group"):
        mask_losses([l1], [])


def test_iou_mse_is_zero_when_the_head_is_right():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    logits = (target * 2 - 1) * 50
    assert iou_mse(torch.tensor([1.0]), logits, target).item() == pytest.approx(0.0, abs=1e-8)
    assert iou_mse(torch.tensor([0.0]), logits, target).item() == pytest.approx(1.0, abs=1e-6)


def test_dice_score():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    assert dice_score(a, b) == 1.0  # nothing to find, nothing found
    a[0, :2] = True
    assert dice_score(a, b) == 0.0
    b[0, 1:3] = True
    assert dice_score(a, b) == pytest.approx(2 * 1 / 4)
