"""``benchmarks/mask_ceiling.py``: the best-logit optimiser reaches what 64x64 logits can and no more."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_loader import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("mask_ceiling") as module:
        yield module


def test_a_large_blob_is_reachable_and_a_one_pixel_line_is_not(bench):
    blob = np.zeros((256, 256), bool)
    yy, xx = np.mgrid[:256, :256]
    blob[(yy - 120) ** 2 + (xx - 100) ** 2 < 40**2] = True
    line = np.zeros((256, 256), bool)
    line[100, 20:200] = True  # 1 px wide: 4x thinner than a low-res logit cell
    targets = torch.from_numpy(np.stack([blob, line])).float()
    blob_dice, line_dice = bench.best_dice(targets, (256, 256), (256, 256), (0, 0), steps=150)
    assert blob_dice > 0.97
    assert line_dice < 0.9


def test_instances_are_the_ones_eval_scores(bench):
    labels = np.zeros((10, 10), int)
    labels[:3, :3], labels[5:, 5:], labels[0, 9] = 1, 2, 3

    class Sample:
        pass

    sample = Sample()
    sample.labels = labels
    masks = bench.evaluated_instances(sample, index=4, k=2)
    ids = np.random.default_rng([4, 5]).choice(np.array([1, 2, 3]), size=2, replace=False)
    assert [m.sum() for m in masks] == [(labels == i).sum() for i in ids]
