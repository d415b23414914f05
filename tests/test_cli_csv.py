"""`medplib ask/segment --regions file.csv` with CSV files written by napari's own writer."""

import json

import numpy as np
import pytest
import tifffile
from napari_builtins.io import napari_write_points, napari_write_shapes

from napari_medplib.cli import EXIT_BAD_INPUT, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("cli_csv") / "tiny-medplib")


@pytest.fixture
def image_file(tmp_path):
    image = (np.random.default_rng(0).random((60, 80)) * 3000).astype(np.uint16)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, image)
    return path


def test_ask_and_segment_read_napari_csv_regions(model_dir, image_file, tmp_path, capsys):
    shapes = tmp_path / "shapes.csv"
    boxes = [
        np.array([[5.0, 5.0], [5.0, 30.0], [20.0, 30.0], [20.0, 5.0]]),
        np.array([[30.0, 40.0], [30.0, 70.0], [55.0, 70.0], [55.0, 40.0]]),
    ]
    napari_write_shapes(str(shapes), boxes, {"shape_type": ["rectangle", "ellipse"]})
    m = ["--model", str(model_dir), "--json"]

    rc = main(
        [
            "ask",
            str(image_file),
            "Compare <region1> and <region2>.",
            "--regions",
            str(shapes),
            "--max-new-tokens",
            "2",
            *m,
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["regions"] == 2

    labels = tmp_path / "two.tif"
    rc = main(
        ["segment", str(image_file), "--regions", str(shapes), "--labels-out", str(labels), *m]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["masks"] == [1, 2]
    assert tifffile.imread(labels).max() <= 2

    points = tmp_path / "clicks.csv"
    napari_write_points(
        str(points),
        np.array([[20.0, 30.0], [50.0, 70.0]]),
        {"properties": {"label": np.array([1, 0])}},
    )
    rc = main(["segment", str(image_file), "--regions", str(points), *m])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["masks"] == [1]  # one prompt set: a positive and a negative click


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("table.csv", "x,y,area\n1,2,3\n", "index,shape-type,vertex-index,axis-0,axis-1"),
        (
            "shapes.csv",
            "index,shape-type,vertex-index,axis-0,axis-1\n0,circle,0,1,2\n",
            "unknown shape-type",
        ),
        ("regions.txt", "0,1\n", "napari Shapes/Points .csv"),
    ],
)
def test_bad_csv_is_bad_input_with_one_line(name, text, expected, image_file, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    # the regions file is checked before any model is loaded, so no model folder is needed here
    rc = main(
        ["segment", str(image_file), "--regions", str(path), "--model", str(tmp_path / "unused")]
    )
    _out, err = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and expected in lines[0], err
