"""measure(): per-object table columns and values on known shapes; counting; JSON rows."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medplib.engine.measure import COLUMNS, count_instances, measure, table_rows


def _shapes():
    labels = np.zeros((60, 80), np.int32)
    labels[10:20, 5:25] = 3  # 10 x 20 rectangle
    yy, xx = np.mgrid[:60, :80]
    labels[(yy - 40) ** 2 + (xx - 50) ** 2 <= 8**2] = 7  # disc of radius 8
    intensity = np.zeros((60, 80), np.float32)
    intensity[labels == 3] = 100.0
    intensity[labels == 7] = 40.0
    intensity[45, 50] = 400.0  # one bright pixel inside the disc
    return labels, intensity


def test_columns_and_values_match_the_shapes():
    labels, intensity = _shapes()
    table = measure(labels, intensity)
    assert tuple(table) == COLUMNS
    assert table["label"].tolist() == [3, 7] and table["label"].dtype == np.int32
    rect, disc = 0, 1
    assert table["area"][rect] == 200 and table["area"][disc] == int((labels == 7).sum())
    assert (table["centroid_y"][rect], table["centroid_x"][rect]) == pytest.approx((14.5, 14.5))
    assert (table["centroid_y"][disc], table["centroid_x"][disc]) == pytest.approx((40.0, 50.0), abs=0.1)
    assert [table[k][rect] for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")] == [10, 5, 20, 25]
    assert [table[k][disc] for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")] == [32, 42, 49, 59]
    assert table["mean_intensity"][rect] == pytest.approx(100.0)
    n = table["area"][disc]
    assert table["mean_intensity"][disc] == pytest.approx((40.0 * (n - 1) + 400.0) / n)
    assert table["eccentricity"][disc] < 0.1  # a circle
    assert table["eccentricity"][rect] == pytest.approx(np.sqrt(1 - (10 / 20) ** 2), abs=0.02)  # 1:2 ellipse


def test_no_intensity_gives_nan_and_rgb_is_averaged():
    labels, intensity = _shapes()
    assert np.isnan(measure(labels)["mean_intensity"]).all()
    rgb = np.stack([intensity, intensity * 0, intensity * 2], axis=-1)
    assert measure(labels, rgb)["mean_intensity"][0] == pytest.approx(100.0)


def test_empty_labels_give_typed_empty_columns():
    table = measure(np.zeros((5, 5), np.int32))
    assert tuple(table) == COLUMNS and all(len(v) == 0 for v in table.values())


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="integer .H, W. label image"):
        measure(np.zeros((5, 5), float))
    with pytest.raises(ValueError, match="give the plane the labels were made on"):
        measure(np.zeros((5, 5), np.int32), np.zeros((4, 4)))


def test_count_instances_whole_and_within():
    labels, _ = _shapes()
    assert count_instances(labels) == 2
    within = np.zeros(labels.shape, bool)
    within[30:, 40:] = True  # holds the disc's centre only
    assert count_instances(labels, within) == 1
    assert count_instances(np.zeros((3, 3), np.int32)) == 0


def test_rows_are_json_ready():
    import json

    labels, _ = _shapes()
    rows = table_rows(measure(labels))
    assert len(rows) == 2 and rows[0]["label"] == 3 and rows[0]["mean_intensity"] is None
    json.dumps(rows)
