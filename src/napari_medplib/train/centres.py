"""Object-centre targets and loss for the model's counter (``model.counter``; ``kind = "counter"`` stages).

Each instance becomes a Gaussian on its count noun's heatmap channel, peaking at exactly 1 in the cell
of its centre — the centroid of the instance with its holes filled — with a width that grows with the
instance's inscribed radius, so one large cell makes one peak, not several. The centroid, not a point
inside the instance: the first counter (``counter22``) was trained on the pixel deepest inside each
instance, which is nowhere in particular along a tube of even width or a ring of cytoplasm, and it
undercounted mitochondria by 8.8 and cells by 3.1 per image; a centroid is one well-defined point. The loss is CenterNet's penalty-reduced focal
loss (Zhou et al. 2019): a peak cell is pulled to 1, every other cell to 0, less so near a centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from ..model.counter import COUNT_STRIDE
from ..model.preprocess import CLIP_SIZE, centre_pad_offsets, resize_longest_side_hw
from .conversations import count_noun
from .data import Sample


def instance_centres(labels: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, centres [N, 2] (row, col) pixels, inscribed radii [N] pixels) of a label image's instances:
    the centroid of each instance with its holes filled (a ring's is its middle)."""
    ids = [int(i) for i in np.unique(labels) if i]
    if not ids:
        return [], np.zeros((0, 2)), np.zeros(0)
    padded = np.pad(labels, 1)
    same = np.ones(labels.shape, dtype=bool)  # pixels whose 4 neighbours all share their label
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        same &= padded[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] == labels
    depth = ndi.distance_transform_edt((labels > 0) & same)
    slices = ndi.find_objects(labels)
    centres = np.zeros((len(ids), 2))
    for n, label_id in enumerate(ids):
        where = slices[label_id - 1]
        rows, cols = np.nonzero(ndi.binary_fill_holes(labels[where] == label_id))
        centres[n] = rows.mean() + where[0].start, cols.mean() + where[1].start
    radii = np.asarray(ndi.maximum(depth, labels, ids), dtype=np.float64).reshape(-1) + 0.5
    return ids, centres, radii


def centre_targets(samples: Sequence[Sample], nouns: Sequence[str]) -> torch.Tensor:
    """Per sample, one heatmap per count noun on the counter's grid [B, K, 84, 84] (see module doc);
    instances whose category's count noun is not in ``nouns`` are left out."""
    grid = CLIP_SIZE // COUNT_STRIDE
    channel_of = {noun: k for k, noun in enumerate(nouns)}
    out = np.zeros((len(samples), len(nouns), grid, grid), dtype=np.float32)
    rows, cols = np.mgrid[0:grid, 0:grid].astype(np.float32)
    for b, sample in enumerate(samples):
        h, w = sample.labels.shape
        resize_hw = resize_longest_side_hw(h, w, CLIP_SIZE)
        top, left = centre_pad_offsets(resize_hw, CLIP_SIZE)
        scale = resize_hw[0] / h / COUNT_STRIDE  # image pixels -> grid cells
        for label_id, (row, col), radius in zip(*instance_centres(sample.labels), strict=True):
            channel = channel_of.get(count_noun(sample.categories.get(label_id, "")))
            if channel is None:
                continue
            r = int(np.clip(((row + 0.5) * resize_hw[0] / h + top) // COUNT_STRIDE, 0, grid - 1))
            c = int(np.clip(((col + 0.5) * resize_hw[1] / w + left) // COUNT_STRIDE, 0, grid - 1))
            sigma = max(0.7, radius * scale / 2)
            gauss = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
            np.maximum(out[b, channel], gauss, out=out[b, channel])
            out[b, channel, r, c] = 1.0
    return torch.from_numpy(out)


def centre_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CenterNet's focal loss (alpha 2, beta 4), summed and divided by the number of centres."""
    targets = targets.to(logits.device)
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    centre = targets >= 1.0
    positive = torch.log(p) * (1 - p) ** 2 * centre
    negative = torch.log(1 - p) * p**2 * (1 - targets) ** 4 * ~centre
    return -(positive.sum() + negative.sum()) / centre.sum().clamp_min(1)
