"""napari's own Shapes / Points CSV files -> napari layer data, without napari.

Used by the ``medplib`` command line, which must stay napari-free. It is deliberately *not* an npe2
reader: inside napari, napari's built-in reader opens these files and the plugin takes the layers
it makes, so registering this one too would only offer two readers for the same file.

The layouts are the ones napari's writer (``napari_builtins.io.napari_write_shapes`` /
``napari_write_points``, behind ``layer.save('x.csv')``) produces:

Shapes: ``index,shape-type,vertex-index,axis-0,axis-1[,axis-2...]``
    one row per vertex. Rows with the same ``index`` in a block make one shape, vertices in file
    order (napari ignores ``vertex-index`` too); ``shape-type`` is one of rectangle, ellipse,
    polygon, path, line (ellipses and rectangles are stored as their 4 box corners). napari writes
    no colours or features for shapes; each shape gets ``feature_index`` = its CSV ``index`` and
    ``hole_of`` = -1, like the other readers (see :mod:`._common`).
Points: ``index,axis-0,axis-1[,axis-2...][,feature columns...]``
    one row per point; every column other than ``index`` and the axes is kept as a feature column:
    integers if every value reads as one, else floats if every value does, else text (napari's
    reader converts the same way). Without text columns napari writes every number as a float,
    ``index`` and integer features included (``0.0``).

``axis-0`` ... are napari's data axes; the last two are (row, col). Coordinates are used unchanged.
"""

from __future__ import annotations

import csv
import itertools
import re
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    FeatureTable,
    LayerData,
    file_error,
    finish_layers,
    layer_name,
    points_layer,
    reading,
    shapes_layer,
)

SHAPE_COLUMNS = ("index", "shape-type", "vertex-index")
SHAPE_TYPES = ("rectangle", "ellipse", "polygon", "path", "line")
EXPECTED = (
    "expected napari's Shapes columns 'index,shape-type,vertex-index,axis-0,axis-1[,axis-2...]' "
    "or Points columns 'index,axis-0,axis-1[,...][,features]'"
)
_AXIS = re.compile(r"axis-(\d+)$")
FIX = "Save the Shapes or Points layer from napari again"
#: Most axes a napari layer in a CSV may have (napari's own limit is memory, not a number).
MAX_AXES = 32
#: Most columns in the header (axes plus point features).
MAX_COLUMNS = 10_000


def read_napari_csv(path: str | Path) -> list[LayerData]:
    """Read a Shapes or Points CSV written by napari into one layer (see module docs).

    Raises only :class:`RegionFileError` (naming the file): for an unreadable or empty file, a CSV
    without napari's columns, short rows, non-numeric coordinates or an unknown shape type.
    Rows are parsed one at a time (coordinates straight into a float array), so memory follows the
    file; the header may name at most :data:`MAX_AXES` axes and :data:`MAX_COLUMNS` columns.
    """
    path = Path(path)
    with reading(path, FIX):
        rows = _rows(path)
        header = next(rows, None)
        if header is None:
            raise file_error(
                path, "the file is empty", "Save the Shapes or Points layer from napari again"
            )
        header = header[1]
        axes = _axis_columns(path, header)
        layer = (_shapes if "shape-type" in header else _points)(path, header, rows, axes)
        return finish_layers(path, [layer], FIX)


# ----------------------------------------------------------------------------------------- table
def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of every non-blank row, read one at a time."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for n, cells in enumerate(csv.reader(handle), 1):
                if any(c.strip() for c in cells):
                    yield n, [c.strip() for c in cells]
    except OSError as exc:
        raise file_error(
            path, f"cannot be read ({exc.strerror})", "Check the path and permissions"
        ) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise file_error(
            path, f"is not a readable CSV text file ({exc})", "Save the layer from napari again"
        ) from exc


def _body(
    path: Path, header: Sequence[str], rows: Iterator[tuple[int, list[str]]]
) -> Iterator[tuple[int, list[str]]]:
    """The data rows; each must be as long as the header, and there must be one."""
    empty = True
    for line, cells in rows:
        if len(cells) != len(header):
            raise file_error(
                path,
                f"line {line} has {len(cells)} values but the header has {len(header)} columns",
                "Every row needs one value per column; the file may be truncated",
            )
        empty = False
        yield line, cells
    if empty:
        raise file_error(
            path, "holds no shapes or points (only a header row)", "Save a layer that has some"
        )


def _axis_columns(path: Path, header: Sequence[str]) -> list[int]:
    """Column positions of axis-0, axis-1, ... (in axis order); they must be complete."""
    if len(header) > MAX_COLUMNS:
        raise file_error(
            path, f"has {len(header):,} columns (at most {MAX_COLUMNS:,})", "Save the layer again"
        )
    found = [(m.group(1), i) for i, name in enumerate(header) if (m := _AXIS.match(name))]
    too_many = next((text for text, _ in found if len(text) > 4 or int(text) >= MAX_AXES), None)
    if too_many is not None:
        raise file_error(
            path,
            f"has a column 'axis-{too_many[:20]}', but napari layers have at most {MAX_AXES} axes",
            "The axis columns must be axis-0 .. axis-N as napari writes them",
        )
    numbers = {int(text): i for text, i in found}
    if 0 not in numbers or 1 not in numbers:
        raise file_error(
            path,
            f"is not a napari Shapes or Points CSV (columns: {','.join(header)[:120]})",
            f"The CLI reads CSV files saved by napari; {EXPECTED}",
        )
    missing = [n for n in range(max(numbers)) if n not in numbers]
    if missing:
        raise file_error(
            path,
            f"has no 'axis-{missing[0]}' column",
            f"The axis columns must be axis-0 .. axis-{max(numbers)}",
        )
    if len(numbers) != len(found):
        raise file_error(path, "has a repeated axis column", "Each axis-N column may appear once")
    return [numbers[n] for n in sorted(numbers)]


def _coordinates(
    path: Path, header: Sequence[str], line: int, cells: list[str], axes: list[int], out: array
) -> None:
    """Append one row's coordinates to ``out``; the first non-number is reported with its place."""
    for i in axes:
        try:
            out.append(float(cells[i]))
        except ValueError:
            raise file_error(
                path,
                f"line {line}, column {header[i]!r}: {cells[i][:40]!r} is not a number",
                "Coordinates must be numbers",
            ) from None


def _typed(values: list[str]) -> list[Any]:
    """A feature column as ints, else floats, else text (napari's reader does the same)."""
    for kind in (int, float):
        try:
            return [kind(v) for v in values]
        except (ValueError, OverflowError):
            continue
    return values


def _metadata(path: Path, header: Sequence[str], axes: list[int]) -> dict[str, Any]:
    leading = tuple(header[i] for i in axes[:-2])
    return {"source": str(path), "format": "napari-csv", "axes": (*leading, "y", "x")}


# ----------------------------------------------------------------------------------------- layers
def _shapes(
    path: Path, header: list[str], rows: Iterator[tuple[int, list[str]]], axes: list[int]
) -> LayerData | None:
    """Blocks of rows sharing an ``index`` -> shapes, in file order."""
    missing = [c for c in SHAPE_COLUMNS if c not in header]
    if missing:
        raise file_error(
            path,
            f"has a 'shape-type' column but no {', '.join(repr(c) for c in missing)} column",
            f"Save the Shapes layer from napari again; {EXPECTED}",
        )
    col_index, col_type = header.index("index"), header.index("shape-type")
    flat = array("d")
    starts: list[int] = []  # first row of each shape
    types: list[str] = []
    table = FeatureTable({"feature_index": -1, "hole_of": -1})
    seen: dict[int, int] = {}  # shape index -> line where its block started
    current = None
    k = -1
    for k, (line, cells) in enumerate(_body(path, header, rows)):
        _coordinates(path, header, line, cells, axes, flat)
        index = _shape_index(path, line, cells[col_index])
        kind = cells[col_type].lower()
        if index == current:
            if kind != types[-1]:
                raise file_error(
                    path,
                    f"line {line}: shape {index} changes type from {types[-1]!r} to {kind!r}",
                    "All vertices of one shape need the same shape-type",
                )
            continue
        if kind not in SHAPE_TYPES:
            raise file_error(
                path,
                f"line {line}: unknown shape-type {cells[col_type][:40]!r}",
                f"Use one of {', '.join(SHAPE_TYPES)}",
            )
        if index in seen:
            raise file_error(
                path,
                f"line {line}: the rows of shape {index} are split (its first block starts at "
                f"line {seen[index]})",
                "Keep each shape's rows together, as napari writes them",
            )
        seen[index], current = line, index
        starts.append(k)
        types.append(kind)
        table.add({"feature_index": index, "hole_of": -1})
    coords = np.frombuffer(flat, dtype=float).reshape(-1, len(axes))
    bounds = [*starts, k + 1]
    shapes = [coords[a:b] for a, b in itertools.pairwise(bounds)]
    return shapes_layer(
        layer_name(path), shapes, types, table, [None] * len(shapes), _metadata(path, header, axes)
    )


def _shape_index(path: Path, line: int, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise file_error(
            path, f"line {line}: shape index {text!r} is not a whole number", "Use 0, 1, 2, ..."
        )
    return int(value)


def _points(
    path: Path, header: list[str], rows: Iterator[tuple[int, list[str]]], axes: list[int]
) -> LayerData | None:
    """One point per row; columns other than ``index`` and the axes become features."""
    columns = [i for i, name in enumerate(header) if i not in axes and name != "index"]
    names = [header[i] for i in columns]
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        raise file_error(path, f"has the feature column {repeated!r} twice", "Rename one of them")
    flat = array("d")
    cells_of: list[list[str]] = [[] for _ in columns]
    for line, cells in _body(path, header, rows):
        _coordinates(path, header, line, cells, axes, flat)
        for values, i in zip(cells_of, columns, strict=True):
            values.append(cells[i])
    coords = np.frombuffer(flat, dtype=float).reshape(-1, len(axes))
    table = FeatureTable()
    table.columns = {name: _typed(values) for name, values in zip(names, cells_of, strict=True)}
    table.n_rows = len(coords)
    return points_layer(
        layer_name(path), coords, table, [None] * len(coords), _metadata(path, header, axes)
    )
