"""Pure parts of ``benchmarks/finetune_real.py``: the partial annotation and the grounding score with a
stand-in session (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from bench_loader import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("finetune_real") as module:
        yield module


def _labels() -> np.ndarray:
    labels = np.zeros((40, 40), np.int32)
    for i, (r, c) in enumerate([(2, 2), (2, 20), (20, 2), (20, 20)], start=1):
        labels[r : r + 8, c : c + 8] = i
    return labels


class Replies:
    """A stand-in session answering every question with fixed instance labels."""

    def __init__(self, instances: np.ndarray) -> None:
        self.instances = instances

    def ask(self, image, question, **kwargs):
        return SimpleNamespace(instances=[self.instances], masks=[self.instances > 0], text="It is <SEG>.")


def test_keep_only_leaves_a_partial_annotation(bench):
    labels = _labels()
    kept = bench.keep_only(labels, [2, 4])
    assert sorted(np.unique(kept)) == [0, 2, 4] and (kept[labels == 2] == 2).all()


def test_grounding_scores_untrained_objects_only(bench):
    labels = _labels()
    image = (labels > 0).astype(np.uint8) * 200
    perfect = bench.grounding_f1(Replies(labels), [(image, labels, [1, 2])], "nuclei")
    assert perfect["ground_f1"] == 1.0  # the trained objects' masks are not false positives
    trained_only = np.where(np.isin(labels, [1, 2]), labels, 0)
    assert bench.grounding_f1(Replies(trained_only), [(image, labels, [1, 2])], "nuclei")["ground_f1"] == 0.0
    assert bench.grounding_f1(Replies(trained_only), [(image, labels, None)], "nuclei")["ground_f1"] == pytest.approx(
        2 * 2 / (4 + 2))
