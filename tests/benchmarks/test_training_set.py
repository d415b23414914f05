"""``benchmarks/real_data/training_set.py`` (real training images for the bundled SAM) and the pure parts of
``scripts/train_real_sam.py``: contours to labels, limits, and that nothing the benchmark scores is trained on."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from napari_medplib.testing import load_file_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def training_set():
    return load_file_module(ROOT / "benchmarks" / "real_data" / "training_set.py", "medplib_training_set")


def _xml(polygons) -> bytes:
    shapes = "".join("<Shape Type=\"SmoothPolygon\"><Data><Points>" + "".join(
        f'<Point X="{x}" Y="{y}" />' for y, x in poly) + "</Points></Data></Shape>" for poly in polygons)
    return f"<Document><Layers><Layer><Shapes>{shapes}</Shapes></Layer></Layers></Document>".encode()


def test_contours_become_one_label_per_object(training_set):
    square = [(2, 2), (2, 9), (9, 9), (9, 2)]
    triangle = [(12, 12), (12, 19), (19, 12)]
    labels = training_set.contour_labels(_xml([square, triangle, [(0, 0), (1, 1)]]), (24, 24))
    assert sorted(np.unique(labels)) == [0, 1, 2]  # the two-point contour is skipped
    assert labels[5, 5] == 1 and labels[13, 13] == 2 and labels[0, 0] == 0
    assert 40 <= (labels == 1).sum() <= 64


def test_contours_outside_the_image_are_clipped_and_limits_hold(training_set, monkeypatch):
    labels = training_set.contour_labels(_xml([[(-5, -5), (-5, 4), (4, 4), (4, -5)]]), (8, 8))
    assert labels.shape == (8, 8) and labels[0, 0] == 1 and labels[6, 6] == 0
    monkeypatch.setattr(training_set, "MAX_POLYGONS", 1)
    with pytest.raises(training_set.CatalogError, match="limit"):
        training_set.contour_labels(_xml([[(0, 0), (0, 3), (3, 3)]] * 2), (8, 8))


def test_nothing_scored_by_the_benchmark_is_trained_on(training_set):
    cat = training_set._catalog
    scored = {(e.source, p) for e in cat.CATALOG for p in (e.image.path, e.labels.path)}
    trained = {(e.source, p) for e in training_set.TRAINING for p in (e.image.path, e.labels.path)}
    assert trained and not scored & trained
    assert all(e.split == "train" for e in training_set.TRAINING)
    # serial sections: no training slice within 5 sections of a report slice of the same volume
    report = {int(m.group(1)) for e in cat.CATALOG if e.split == "report"
              for m in [re.search(r"isbi2012_tem_s(\d+)", e.name)] if m}
    slices = {int(e.name[-2:]) for e in training_set.TRAINING if e.name.startswith("isbi2012_tem_train_")}
    assert report and all(abs(s - r) > 5 for s in slices for r in report)
    assert len({e.name for e in training_set.TRAINING}) == len(training_set.TRAINING)


def test_spread_picks_evenly_and_keeps_short_lists():
    script = load_file_module(ROOT / "scripts" / "train_real_sam.py", "medplib_train_real_sam")
    assert script.spread(list(range(9)), 3) == [0, 4, 8]
    assert script.spread([1, 2], 5) == [1, 2]


def test_a_deepliif_file_gives_its_ihc_or_dapi_panel_with_the_mask_panels_nuclei(training_set, tmp_path):
    from PIL import Image

    side = 32
    panels = np.zeros((side, 6 * side, 3), np.uint8)
    panels[:, :side] = (200, 180, 150)  # IHC
    panels[:, 2 * side : 3 * side] = 90  # DAPI, grey as RGB
    mask = panels[:, 5 * side :]
    mask[4:12, 4:12] = (0, 0, 255)  # a Ki67- nucleus (blue fill)
    mask[18:28, 18:28] = (255, 0, 0)  # a Ki67+ nucleus (red fill)
    path = tmp_path / "tile.png"
    Image.fromarray(panels).save(path)
    ihc, labels = training_set.LOADERS["deepliif_panel_0"](None, path, path)
    dapi, labels2 = training_set.LOADERS["deepliif_panel_2"](None, path, path)
    assert ihc.shape == (side, side, 3) and (ihc == (200, 180, 150)).all()
    assert dapi.shape == (side, side) and (dapi == 90).all()
    assert labels.max() == 2 and np.array_equal(labels, labels2)
    assert (labels[4:12, 4:12] > 0).all() and labels[5, 5] != labels[20, 20]
    Image.fromarray(panels[:, : 5 * side]).save(path)
    with pytest.raises(training_set.CatalogError, match="six"):
        training_set.LOADERS["deepliif_panel_0"](None, path, path)


def test_a_binary_mask_gives_one_label_per_connected_component(training_set, tmp_path):
    from PIL import Image

    image = np.full((20, 30, 3), 120, np.uint8)
    mask = np.zeros((20, 30, 3), np.uint8)
    mask[2:6, 2:6] = 255
    mask[10:15, 20:28] = 255
    mask[18, 0] = 100  # below half: background
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "msk.png")
    entry = next(e for e in training_set.TRAINING if e.loader == "png_rgb+binary_cc")
    got_image, labels = training_set.LOADERS[entry.loader](entry, tmp_path / "img.png", tmp_path / "msk.png")
    assert got_image.shape == (20, 30, 3)
    assert labels.max() == 2 and labels[3, 3] != labels[12, 22] and labels[18, 0] == 0
    assert {e.modality for e in training_set.TRAINING} >= {"brightfield", "he", "tem", "phase", "ihc", "sem"}
