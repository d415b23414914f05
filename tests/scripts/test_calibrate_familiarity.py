"""scripts/calibrate_familiarity.py: held-out rates and the choice of settings, on made-up descriptors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_medplib.testing import load_file_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "calibrate_familiarity.py"


def _script():
    return load_file_module(SCRIPT, "calibrate_familiarity")


def _data(offset: float):
    """Three microscopy sources around 0 and three kinds of other images around ``offset``."""
    rng = np.random.default_rng(0)
    micro = np.concatenate([rng.normal(0, 1, (30, 5)) + i * 0.3 for i in range(3)])
    other = np.concatenate([rng.normal(offset, 1, (15, 5)) + i * 0.3 for i in range(3)])
    return micro, [f"s{i}" for i in range(3) for _ in range(30)], other, [f"k{i}" for i in range(3) for _ in range(15)]


def test_held_out_rates_fall_with_the_threshold_and_follow_the_separation():
    script = _script()
    micro, sources, other, kinds = _data(4.0)
    false, caught = script.held_out_rates(micro, sources, other, kinds, 0.01, [0.3, 0.6, 0.9])
    assert np.all(np.diff(false) <= 0) and np.all(np.diff(caught) <= 0)
    assert false[-1] < 0.1 and caught[0] > 0.9  # well separated: few false declines, most caught
    _, caught_close = script.held_out_rates(*_data(0.5), 0.01, [0.9])
    assert caught_close[0] < caught[-1]  # overlapping: fewer caught at the same threshold


def test_choose_respects_the_false_decline_limit(capsys):
    script = _script()
    micro, sources, other, kinds = _data(1.5)
    l2, threshold = script.choose(micro, sources, other, kinds, [0.01, 0.1], [0.5, 0.7, 0.9], max_false=0.05)
    false, _ = script.held_out_rates(micro, sources, other, kinds, l2, [threshold])
    assert false[0] <= 0.05
    assert "chosen: l2" in capsys.readouterr().out


def test_answer_below_lets_at_most_the_allowed_share_of_each_kind_through():
    script = _script()
    p = np.array([0.1, 0.6, 0.7, 0.9, 0.3, 0.8, 0.85, 0.95])
    kinds = ["a"] * 4 + ["b"] * 4
    below = script.choose_answer_below(p, kinds, threshold=0.9, max_pass=0.25)
    assert script.per_group_mean(p < below, kinds) <= 0.25
    assert below > 0.3  # the lowest of each kind may pass (one of four)
    assert script.choose_answer_below(p, kinds, threshold=0.9, max_pass=0.0) <= 0.1
