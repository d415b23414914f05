"""The best box/point-prompt Dice any SAM-Med2D decoder could reach on the held-out synthetic split.

SAM-Med2D (like SAM) predicts a 64 x 64 low-resolution logit map for its 256-px input; the engine
upsamples it (``postprocess_masks``) and thresholds it. A 256-px image therefore gets one logit per
4 x 4 pixels, and objects a few pixels wide (H&E nuclei, thin tubular organelles) cannot be drawn
exactly whatever the decoder predicts. This script measures that ceiling: for each evaluated instance
(the same instances ``medplib eval`` scores for box/point prompts) it optimises a free 64 x 64 logit map
directly against the instance mask through the engine's own upsampling and threshold, and reports the
Dice of the best map, per image style. A model's box/point mDice is bounded by these numbers.

    python benchmarks/mask_ceiling.py [--n 40] [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from napari_medplib.model.postprocess import MASK_THRESHOLD, postprocess_masks
from napari_medplib.train.batches import prepare_image
from napari_medplib.train.evaluate import heldout
from napari_medplib.train.losses import dice_score


def evaluated_instances(sample, index: int, k: int) -> list[np.ndarray]:
    """The instances ``evaluate._prompt_scores`` draws for image ``index`` (same seeded choice)."""
    ids = np.unique(sample.labels)
    ids = ids[ids > 0]
    if not len(ids):
        return []
    chosen = np.random.default_rng([index, 5]).choice(ids, size=min(k, len(ids)), replace=False)
    return [sample.labels == i for i in chosen]


def best_dice(targets: torch.Tensor, resize_hw, original_hw, pad, steps: int, low_res: int = 64) -> list[float]:
    """Dice of the best (N, 1, low_res, low_res) logit maps for ``targets`` (N, H, W) after upsampling."""
    logits = torch.zeros(targets.shape[0], 1, low_res, low_res, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.3)
    for _ in range(steps):
        upsampled = postprocess_masks(logits, resize_hw, original_hw, pad=pad)
        probs = torch.sigmoid(upsampled)
        soft_dice = 1 - (2 * (probs * targets).sum((1, 2)) + 1) / (probs.sum((1, 2)) + targets.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(upsampled, targets) + soft_dice.mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        masks = torch.sigmoid(postprocess_masks(logits, resize_hw, original_hw, pad=pad)) > MASK_THRESHOLD
    return [float(dice_score(m, t)) for m, t in zip(masks, targets, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="held-out images (default 40)")
    parser.add_argument("--instances", type=int, default=8, help="instances per image, as medplib eval (8)")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per image (300)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    scores: dict[str, list[float]] = defaultdict(list)
    start = time.perf_counter()
    for index, (sample, _) in enumerate(heldout(args.n, n_per_task=1)):
        masks = evaluated_instances(sample, index, args.instances)
        if not masks:
            continue
        image = prepare_image(sample)
        targets = torch.from_numpy(np.stack(masks)).float()
        dice = best_dice(targets, image.resize_hw, image.original_hw, image.pad, args.steps)
        scores[sample.style] += dice
        scores["all"] += dice
    rows = {style: {"ceiling_dice": round(float(np.mean(v)), 4), "instances": len(v)} for style, v in sorted(scores.items())}
    print(f"{'style':12s} {'instances':>9s} {'best possible Dice (64x64 logits)':>34s}")
    for style, row in rows.items():
        print(f"{style:12s} {row['instances']:9d} {row['ceiling_dice']:34.3f}")
    print(f"({args.n} held-out images, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"n_images": args.n, "steps": args.steps, "styles": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
