"""``benchmarks/real_counts.py``: the reference count of a window, and one pass over a synthetic
frame with a tiny counting model (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_loader import benchmark_module

from napari_medplib.engine import Session
from napari_medplib.testing import tiny_model


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("real_counts") as module:
        yield module


def test_a_window_counts_instances_with_enough_pixels(bench):
    labels = np.zeros((40, 40), int)
    labels[0:10, 0:10] = 1
    labels[20:22, 20:25] = 2  # 10 pixels: a sliver, not counted
    labels[30:40, 30:40] = 5
    assert bench.window_count(labels) == 2
    assert bench.window_count(labels, min_pixels=10) == 3
    assert bench.parse_count("There are 12 nuclei.") == 12 and bench.parse_count("none") is None


def test_count_windows_reads_the_answer_and_the_counter(bench):
    model = tiny_model(count_nouns=["bacteria", "nuclei"])
    with torch.no_grad():
        model.counter.head[-1].bias.fill_(0.0)  # a random counter that finds some centres
    session = Session.from_model(model, name="tiny")
    labels = np.zeros((300, 300), int)
    for k, (r, c) in enumerate([(20, 20), (60, 200), (150, 150), (250, 40)], start=1):
        labels[r : r + 15, c : c + 15] = k
    image = (labels > 0).astype(np.uint16) * 1000 + 100
    rows = bench.count_windows(session, image, labels, "nuclei", window=256)
    assert len(rows) == 4  # 2 x 2 windows (starts 0 and 44 on each axis), each holding some instances
    assert all(1 <= row["truth"] <= 4 and isinstance(row["counter"], int) for row in rows)
    summary = bench.summary(rows)
    assert summary["windows"] == 4 and 0 <= summary["counter_exact"] <= 1
