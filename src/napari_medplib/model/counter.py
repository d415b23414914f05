"""Object counts for the LLM: a small centre detector whose per-noun counts condition the image and
region tokens (our extension).

Why: MedPLIB's LLM counts by reading CLIP's 576 patch tokens, and a small vision tower trained from
scratch does not separate touching instances: image-level counts ("How many nuclei are there?") stayed
at 0.2-0.3 exact through every stage IV, an auxiliary density loss on the tower did not help, and a
linear probe on the image tokens counted no better (docs/model-card.md, Findings). Counting is what
detectors do well, so the model gets one:

1. ``ObjectCounter.heatmap``: a small CNN on the CLIP frame ([B, 3, 336, 336], the pixels CLIP reads)
   gives one object-centre heatmap per count noun ("nuclei", "cells", ...) at stride 4 ([B, K, 84, 84]),
   trained as CenterNet is (focal loss against Gaussians at each instance's centre; ``train.centres``);
2. ``count_peaks``: a local maximum above ``count_threshold`` is one object, so counts are integers;
3. ``ObjectCounter.image_bias``: every image token gains ``sum_k image_count_embed[k, n_k]`` for the
   n_k objects of noun k in the image — a global conditioning vector, read through the attention the
   LLM already pays to the image (separate count tokens after the image were tried first: a trained
   LLM did not learn to attend to five new tokens among 581, docs/model-card.md);
4. ``ObjectCounter.region_bias``: a region's token (``<region>``) gains ``region_count_embed[k, n]``
   for the n centres of noun k inside it ("How many nuclei are in <region>?").

Both tables start at zero, so adding a counter to a trained model changes no answer until they train.
A model without ``config.count_nouns`` (the released MedPLIB) has no counter. Weights ``counter.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MedPLIBConfig

#: Heatmap cells per CLIP-frame pixel: 336 px -> 84 x 84 cells of 4 px.
COUNT_STRIDE = 4


class _Block(nn.Module):
    """Pre-norm residual 3x3 conv pair; ``dilation`` widens the receptive field at no cost."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(self.norm(x)))))


def count_peaks(heatmap_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, K, h, w] logits -> [B, K, h, w] bool: cells that are a 3x3 local maximum with probability above
    ``threshold`` (CenterNet's max-pool NMS). Each peak is one object."""
    probability = torch.sigmoid(heatmap_logits.float())
    local_max = F.max_pool2d(probability, 3, stride=1, padding=1)
    return (probability == local_max) & (probability > threshold)


class ObjectCounter(nn.Module):
    """CLIP pixels -> per-noun object-centre heatmaps and peaks; the count vectors image and region tokens gain."""

    def __init__(self, config: MedPLIBConfig) -> None:
        super().__init__()
        nouns = len(config.count_nouns)
        width = config.count_width
        self.threshold = config.count_threshold
        self.max_count = config.count_max
        self.stem = nn.Sequential(  # 336 -> 168 -> 84
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.fine = nn.Sequential(_Block(width, 1), _Block(width, 2))  # 84
        self.down1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # 42
        self.middle = nn.Sequential(_Block(2 * width, 1), _Block(2 * width, 2))
        self.down2 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)  # 21
        self.coarse = nn.Sequential(_Block(2 * width, 1), _Block(2 * width, 2), _Block(2 * width, 4))
        self.up = nn.Conv2d(2 * width, width, 1)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, nouns, 1))
        nn.init.constant_(self.head[-1].bias, -2.19)  # CenterNet's prior: p = 0.1 everywhere at the start
        #: what every image token gains from the image's objects of each noun, and a region token from
        #: those inside it; zero until trained, so a model answers exactly as before its counter was added
        self.image_count_embed = nn.Parameter(torch.zeros(nouns, config.count_max + 1, config.hidden_size))
        self.region_count_embed = nn.Parameter(torch.zeros(nouns, config.count_max + 1, config.hidden_size))

    def heatmap(self, clip_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, 336, 336] -> centre logits [B, K, 84, 84]."""
        x = self.fine(self.stem(clip_pixel_values.to(self.up.weight.dtype)))  # [B, W, 84, 84]
        middle = self.middle(self.down1(x))  # [B, 2W, 42, 42]
        coarse = self.coarse(self.down2(middle))  # [B, 2W, 21, 21]
        middle = middle + F.interpolate(coarse, size=middle.shape[-2:], mode="bilinear", align_corners=False)
        x = x + self.up(F.interpolate(middle, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.head(x)

    def peaks(self, clip_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, 336, 336] -> [B, K, 84, 84] bool object centres."""
        return count_peaks(self.heatmap(clip_pixel_values), self.threshold)

    def _table(self, table: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[N, K] counts -> [N, D], the sum over nouns k of ``table[k, count]`` (counts above
        ``count_max`` read as it)."""
        index = counts.long().clamp(0, self.max_count)
        nouns = torch.arange(index.shape[1], device=index.device)
        return table[nouns[None], index].sum(dim=1)

    def image_bias(self, counts: torch.Tensor) -> torch.Tensor:
        """[B, K] counts in each image -> [B, D], added to every one of its image tokens."""
        return self._table(self.image_count_embed, counts)

    @staticmethod
    def region_counts(region_masks: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        """Objects of each noun whose centre lies in each region: masks [R, S, S] on the CLIP frame, one
        image's peaks [K, g, g] -> [R, K] (a peak's cell is in the region when the cell's centre pixel is)."""
        step = region_masks.shape[-1] // peaks.shape[-1]
        cells = region_masks[:, step // 2 :: step, step // 2 :: step].bool()  # [R, g, g]
        return (cells[:, None] & peaks[None].to(cells.device)).sum(dim=(-2, -1))

    def region_bias(self, counts: torch.Tensor) -> torch.Tensor:
        """[R, K] counts in each region -> [R, D], added to its region token."""
        return self._table(self.region_count_embed, counts)
