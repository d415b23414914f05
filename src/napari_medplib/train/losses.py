"""MedPLIB's training losses (reference section 6): shifted token CE, per-mask BCE and Dice, IoU-MSE.

Mask losses are computed on mask logits at the target's resolution (after ``postprocess_masks``, as
the reference does), BCE averaged over pixels then over masks, Dice with sigmoid and eps 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model.config import IGNORE_INDEX


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted CE: position t predicts label t+1. logits [B, L, V], labels [B, L] (-100 ignored).

    Returns 0 (with a graph) when no label is set, so a batch of mask-only turns still back-propagates.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def mask_bce(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, H, W] logits and 0/1 targets -> BCE averaged over pixels, then over masks."""
    per_mask = F.binary_cross_entropy_with_logits(mask_logits.float(), targets.float(), reduction="none")
    return per_mask.flatten(1).mean(1).mean()


def mask_dice(mask_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice loss 1 - 2|P*T| / (|P| + |T|) per mask (P = sigmoid(logits)), averaged over masks."""
    probs = torch.sigmoid(mask_logits.float()).flatten(1)
    targets = targets.float().flatten(1)
    inter = (probs * targets).sum(1)
    dice = (2 * inter + eps) / (probs.sum(1) + targets.sum(1) + eps)
    return (1 - dice).mean()


def iou_mse(iou_predictions: torch.Tensor, mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between SAM's predicted IoU [N] and the soft IoU of the predicted mask with the target."""
    probs = torch.sigmoid(mask_logits.float()).flatten(1)
    targets = targets.float().flatten(1)
    inter = (probs * targets).sum(1)
    iou = inter / (probs.sum(1) + targets.sum(1) - inter).clamp_min(1e-6)
    return F.mse_loss(iou_predictions.float().flatten(), iou.detach())


def mask_losses(mask_logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) over masks of possibly different sizes: each list item [N_i, H_i, W_i]."""
    if len(mask_logits) != len(targets) or not mask_logits:
        raise ValueError(f"need one target per mask group, got {len(mask_logits)} and {len(targets)}")
    n = sum(m.shape[0] for m in mask_logits)
    bce = sum(mask_bce(m, t) * m.shape[0] for m, t in zip(mask_logits, targets, strict=True)) / n
    dice = sum(mask_dice(m, t) * m.shape[0] for m, t in zip(mask_logits, targets, strict=True)) / n
    return bce, dice


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Hard Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    pred, target = pred.bool(), target.bool()
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & target).sum()) / total
