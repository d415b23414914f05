"""Annotation files with holes and multi-part objects give one region per annotation."""

import numpy as np

from napari_medplib.io.geojson_read import geojson_to_layers
from napari_medplib.regions import regions_from_layer_data


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


DOC = {
    "type": "FeatureCollection",
    "features": [
        {  # a 20x20 square with a 6x6 hole in the middle
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_square(10, 10, 30, 30), _square(17, 17, 23, 23)]},
            "properties": {"classification": {"name": "cell"}},
        },
        {  # two separate squares forming one annotation
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[_square(40, 5, 45, 10)], [_square(50, 5, 55, 10)]],
            },
            "properties": {"classification": {"name": "debris"}},
        },
    ],
}


def test_holes_are_cut_and_parts_merged():
    layers = geojson_to_layers(DOC, "cells.geojson")
    shapes = next(layer for layer in layers if layer[2] == "shapes")
    assert len(shapes[0]) == 4  # outer, hole, two parts: one shape each in napari
    result = regions_from_layer_data(shapes, image_shape=(64, 64))
    assert len(result) == 2
    cell, debris = result.regions
    assert cell.label == "cell" and debris.label == "debris"
    mask = cell.to_mask((64, 64))
    assert mask[12, 12] and not mask[20, 20]  # (row, col): inside the ring, inside the hole
    assert mask.sum() == 21 * 21 - 7 * 7  # pixel centres on the outline are inside, as for any polygon
    parts = debris.to_mask((64, 64))
    assert parts[7, 42] and parts[7, 52] and not parts[7, 48]


def test_plain_shapes_are_not_merged():
    data = [np.array([[0, 0], [0, 5], [5, 5], [5, 0]], float), np.array([[10, 10], [10, 15], [15, 15], [15, 10]], float)]
    result = regions_from_layer_data((data, {"shape_type": "polygon"}, "shapes"), image_shape=(32, 32))
    assert [r.kind for r in result] == ["polygon", "polygon"]
