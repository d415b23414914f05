"""npe2 entry points: readers and writers for region annotation files.

This module is imported by napari for every file that matches our filename patterns, so it imports
only the standard library, numpy and our napari-free readers; roifile, shapely and scikit-image are
imported inside the functions that need them.

Reader contract (npe2): ``get_reader(path)`` never raises. It returns ``None`` when the file is not
ours and a reader function otherwise. How malformed files are handled, consistently for all three
formats:

* **Not ours -> None.** A ``.json`` whose top level is not an object with ``images``,
  ``annotations`` and ``categories`` lists (including a ``.json`` that is not valid JSON at all: it
  cannot be told apart from any other broken JSON file; for files over :data:`SNIFF_BYTES`, one
  without any of those keys at the top level of its first :data:`SNIFF_BYTES`), a ``.zip`` that is not a zip or holds no
  ``.roi`` member, a wrong extension, a directory, a missing file, or a list of paths not all ours.
* **Ours but malformed -> the reader function raises** :class:`RegionFileError` (a ``ValueError``)
  whose message names the file, the problem and the fix; napari shows it as a notification. This
  covers ``.geojson`` files that are empty, truncated, not GeoJSON or hold unsupported geometry
  types, ``.roi`` files that are empty or corrupt, and COCO files with malformed annotations.

Writers follow the npe2 single-layer signature ``(path, data, meta) -> list[str]`` and write
QuPath-importable GeoJSON in the layer's data pixel coordinates (scale/translate are not applied).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._common import LayerData, RegionFileError
from .coco import REQUIRED_KEYS, is_coco, read_coco
from .geojson_read import read_geojson
from .geojson_write import labels_to_geojson, points_to_geojson, shapes_to_geojson, write_geojson
from .imagej import read_imagej, zip_has_rois

ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]

__all__ = [
    "RegionFileError",
    "get_coco_reader",
    "get_geojson_reader",
    "get_imagej_reader",
    "write_labels_geojson",
    "write_points_geojson",
    "write_shapes_geojson",
]


# ----------------------------------------------------------------------------------------- readers
def get_geojson_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """A reader for ``.geojson`` files (QuPath annotation exports), else None."""
    return _reader_for(path, _is_geojson, read_geojson)


def get_imagej_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """A reader for ImageJ ``.roi`` files and RoiSet ``.zip`` archives, else None."""
    return _reader_for(path, _is_imagej, read_imagej)


def get_coco_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """A reader for COCO annotation ``.json`` files, else None (other JSON is declined)."""
    return _reader_for(path, _is_coco_file, read_coco)


def _reader_for(
    path: str | Sequence[str],
    accepts: Callable[[Path], bool],
    read: Callable[[Path], list[LayerData]],
) -> ReaderFunction | None:
    try:
        paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
        if not paths or not all(p.is_file() and accepts(p) for p in paths):
            return None
    except Exception:  # npe2: get_reader must never raise, whatever napari hands us
        return None

    def reader(path: str | Sequence[str]) -> list[LayerData]:
        files = [path] if isinstance(path, str | Path) else list(path)
        return [layer for file in files for layer in read(Path(file))]

    return reader


def _is_geojson(path: Path) -> bool:
    return path.suffix.lower() == ".geojson"


def _is_imagej(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix == ".roi" or (suffix == ".zip" and zip_has_rois(path))


#: How much of a ``.json`` file :func:`get_coco_reader` reads to decide whether it is COCO.
SNIFF_BYTES = 64 * 1024


def _is_coco_file(path: Path) -> bool:
    """COCO by the first :data:`SNIFF_BYTES`: a JSON object with a COCO list among its top-level keys.

    A file shorter than that is parsed and checked exactly; a longer one is not read further (a
    large unrelated JSON file costs nothing to decline). The reader checks the whole file.
    """
    if path.suffix.lower() != ".json":
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES + 1)
        text = head[: SNIFF_BYTES].decode("utf-8-sig", errors="ignore")
        if len(head) <= SNIFF_BYTES:
            return is_coco(json.loads(text))
        keys = top_level_keys(text)
        return keys is not None and any(key in keys for key in REQUIRED_KEYS)
    except (OSError, ValueError, RecursionError):
        return False


def top_level_keys(text: str) -> set[str] | None:
    """The keys of the top-level JSON object that start within ``text`` (a file's beginning).

    None when ``text`` does not start a JSON object. Only strings and nesting are tracked, so this
    is linear in ``text`` and needs no complete document.
    """
    text = text.lstrip()
    if not text.startswith("{"):
        return None
    keys: set[str] = set()
    depth = 0
    in_string = escape = expect_key = False
    start = 0
    for i, char in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif char == "\\":
                escape = True
            elif char == '"':
                in_string = False
                if depth == 1 and expect_key:
                    keys.add(text[start:i])
                    expect_key = False
        elif char == '"':
            in_string, start = True, i + 1
        elif char in "{[":
            depth += 1
            expect_key = depth == 1
        elif char in "}]":
            depth -= 1
            if depth <= 0:
                break
        elif char == "," and depth == 1:
            expect_key = True
    return keys


# ----------------------------------------------------------------------------------------- writers
def write_shapes_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: a Shapes layer -> QuPath GeoJSON (see :mod:`.geojson_write`)."""
    return write_geojson(path, shapes_to_geojson(data, meta))


def write_points_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: a Points layer -> QuPath GeoJSON Point/MultiPoint features."""
    return write_geojson(path, points_to_geojson(data, meta))


def write_labels_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: a 2-D Labels layer -> one QuPath GeoJSON polygon feature per label id."""
    return write_geojson(path, labels_to_geojson(data, meta))
