"""An auxiliary object-density target for the vision tower (our extension; training only).

Why: image-level counts ("How many nuclei are there?", 4-25 objects) stayed at ~0.2 accuracy through
seven stage-IV rounds, and a linear probe on the mean of the image tokens — what an LLM head that
attends evenly over them reads — counted no better (0.27 exact, docs/model-card.md). Nothing asked
the vision tower to make counts legible. Here a linear head reads every patch feature and is trained
to give, per category, the number of object centroids near that patch (a density map, as in crowd
counting): the map sums to the count, so the mean of the patch features then carries the count along
one direction per category, and the LLM can learn to read it. The head is thrown away after training;
the model's architecture and checkpoints are unchanged.

Measured (docs/model-card.md "Findings"): with the tiny recipes' vision tower (2
layers, 64 wide, 14-px patches) it does not work — the density loss hardly fell, in ``count13`` and
in 8,200 density-only steps, and held-out counts stayed at 0.1-0.2 exact. A fresh 7-layer, 192-wide
tower trained on it alone (3,000 steps of 8 on a CPU) rose from 0.01 to 0.18 exact
and was still rising: ``kind = "vision"`` stages (``gpu.toml``'s ``tower``) train a tower so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from ..model.preprocess import CLIP_PATCH, CLIP_SIZE, centre_pad_offsets, resize_longest_side_hw
from .data import Sample

#: Blur of each centroid over the patch grid, in patches (a centroid near a patch border is shared).
DENSITY_SIGMA = 1.0


def density_categories() -> tuple[str, ...]:
    """Every synthetic style's categories, one density channel each (sorted, so fixed)."""
    from .synth import STYLES

    return tuple(sorted({c for style in STYLES.values() for c in style.categories}))


class DensityHead(nn.Module):
    """Patch features [B, P, Dv] -> density [B, C, g, g], one channel per category."""

    def __init__(self, vision_hidden: int, categories: Sequence[str]) -> None:
        super().__init__()
        self.categories = tuple(categories)
        self.linear = nn.Linear(vision_hidden, len(self.categories))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        batch, patches, _ = patch_features.shape
        grid = math.isqrt(patches)
        density = self.linear(patch_features.float())  # [B, P, C]
        return density.transpose(1, 2).reshape(batch, len(self.categories), grid, grid)


def density_maps(samples: Sequence[Sample], categories: Sequence[str], sigma: float = DENSITY_SIGMA) -> torch.Tensor:
    """Per sample and category, the instances' centroids on the CLIP patch grid [B, C, g, g], each
    blurred by `sigma` patches (reflected at the frame's edge, so every map sums to its count)."""
    grid = CLIP_SIZE // CLIP_PATCH
    index = {c: k for k, c in enumerate(categories)}
    out = np.zeros((len(samples), len(categories), grid, grid), dtype=np.float32)
    for b, sample in enumerate(samples):
        labels = sample.labels
        h, w = labels.shape
        resize_hw = resize_longest_side_hw(h, w, CLIP_SIZE)
        top, left = centre_pad_offsets(resize_hw, CLIP_SIZE)
        ids = sorted(sample.categories)
        if not ids:
            continue
        centroids = ndi.center_of_mass(np.ones_like(labels), labels, ids)
        for label_id, (row, col) in zip(ids, centroids, strict=True):
            channel = index.get(sample.categories[label_id])
            if channel is None:
                continue
            r = int(np.clip(((row + 0.5) * resize_hw[0] / h + top) // CLIP_PATCH, 0, grid - 1))
            c = int(np.clip(((col + 0.5) * resize_hw[1] / w + left) // CLIP_PATCH, 0, grid - 1))
            out[b, channel, r, c] += 1.0
        if sigma > 0:
            out[b] = ndi.gaussian_filter(out[b], sigma=(0, sigma, sigma), mode="reflect")
    return torch.from_numpy(out)


def density_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error per patch, summed over the grid, plus the squared error of the totals (the counts)
    scaled down by 10; averaged over images and categories."""
    target = target.to(predicted.device)
    per_patch = ((predicted - target) ** 2).sum(dim=(-2, -1))
    totals = (predicted.sum(dim=(-2, -1)) - target.sum(dim=(-2, -1))) ** 2
    return (per_patch + totals / 10).mean()
