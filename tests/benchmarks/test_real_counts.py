"""``benchmarks/real_counts.py``: the reference count of a window, its windows, the catalog entries it
counts, and one pass over a synthetic frame with a tiny counting model (no network)."""

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


@pytest.mark.parametrize(("length", "window"), [(512, 256), (1026, 256), (300, 256), (200, 256), (700, 100)])
def test_windows_cover_the_axis(bench, length, window):
    starts = bench.window_starts(length, window)
    size = min(window, length)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s <= length - size
        covered[s : s + size] = True
    assert covered.all() and starts == sorted(set(starts))
    assert bench.window_starts(512, 256) == [0, 128, 256] and bench.window_starts(300, 256) == [0, 44]


def test_the_counted_catalog_entries_are_the_nuclei_and_bacteria_images(bench):
    catalog = bench.load_catalog()
    every = bench.counted_entries(catalog)
    assert {e.name for e in every} == {e.name for e in catalog.CATALOG if e.objects in ("nuclei", "bacteria")}
    assert {"dsb2018_nuclei", "hela_ctc", "ecoli_phase"} <= {e.name for e in every}
    assert {e.objects for e in every} <= set(bench.COUNTED)
    tune = bench.counted_entries(catalog, "tune")
    assert tune and all(e.split == "tune" for e in tune)
    report = bench.counted_entries(catalog, "report")
    assert {e.name for e in tune} | {e.name for e in report} == {e.name for e in every}
    assert [e.name for e in bench.counted_entries(catalog, only=["ecoli_phase", "isbi2012_tem_s00"])] == ["ecoli_phase"]


def test_main_counts_each_entry_from_the_catalog(bench, monkeypatch, tmp_path, capsys):
    """``main`` runs over catalog entries (loaded through ``catalog.load``) with the entry's own noun."""
    import json

    catalog = bench.load_catalog()
    labels = np.zeros((300, 300), np.int32)
    for k, (r, c) in enumerate([(20, 20), (60, 200), (150, 150)], start=1):
        labels[r : r + 15, c : c + 15] = k
    loaded = []
    monkeypatch.setattr(catalog, "load", lambda entry, cache: loaded.append((entry.name, cache)) or (
        (labels > 0).astype(np.uint16) * 1000 + 100, labels))
    model = tiny_model(count_nouns=["bacteria", "nuclei"])
    monkeypatch.setattr(Session, "load", classmethod(lambda cls, *a, **k: Session.from_model(model, name="tiny")))
    asked = []
    original = bench.count_windows

    def spy(session, image, labels, noun, **kwargs):
        asked.append(noun)
        return original(session, image, labels, noun, **kwargs)

    monkeypatch.setattr(bench, "count_windows", spy)
    out = tmp_path / "counts.json"
    assert bench.main(["--only", "ecoli_phase", "dsb2018_nuclei", "--cache", str(tmp_path), "--json", str(out)]) == 0
    assert [name for name, _ in loaded] == ["dsb2018_nuclei", "ecoli_phase"]  # catalog order
    assert asked == ["nuclei", "bacteria"] and loaded[0][1] == tmp_path
    results = json.loads(out.read_text())
    assert set(results) == {"dsb2018_nuclei", "ecoli_phase"} and results["ecoli_phase"]["split"] == "report"
    assert results["dsb2018_nuclei"]["summary"]["windows"] == 4
    assert "ecoli_phase" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--only", "isbi2012_tem_s00"])  # neurites are not counted
