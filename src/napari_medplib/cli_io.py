"""The files the `medplib` commands read and write: regions files, label images, object tables.

Shared by the command line (`cli`), batch runs (`batch`) and the demo (`demo`), which all write
their outputs the same way; `cli` re-exports every name. Light: numpy, tifffile and the readers are
imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["BadInput", "atomic_path", "instance_labels", "labels_from_masks", "read_regions", "write_label_tiff",
           "write_table"]


class BadInput(ValueError):
    """Bad command-line input found by the CLI itself."""


def read_regions(path: str, image_hw: tuple[int, int]) -> list:
    """Regions from any file our readers read, on an image plane of ``image_hw``; strict about problems."""
    from .io import read_coco, read_geojson, read_imagej
    from .io.napari_csv import read_napari_csv
    from .regions import RegionError, regions_from_layer_data

    file = Path(path)
    if not file.is_file():
        raise BadInput(f"{path}: no such regions file")
    suffix = file.suffix.lower()
    readers = {".geojson": read_geojson, ".roi": read_imagej, ".zip": read_imagej, ".json": read_coco,
               ".csv": read_napari_csv}
    if suffix not in readers:
        raise BadInput(f"{path}: unsupported regions file {suffix!r}; "
                       "use .geojson, .roi, RoiSet .zip, COCO .json or napari Shapes/Points .csv")
    layers = readers[suffix](file)
    results = [regions_from_layer_data(layer, image_shape=image_hw) for layer in layers]
    if not results:
        raise RegionError(f"{path}: holds no regions")
    combined = results[0]
    for more in results[1:]:
        combined = combined + more
    if combined.problems:
        first = combined.problems[0]
        more = f" (and {len(combined.problems) - 1} more)" if len(combined.problems) > 1 else ""
        raise RegionError(f"{path}: {first.message}{more}")
    return list(combined.raise_if_empty().regions)


def _new_file_mode(path: Path) -> int:
    """The permissions ``path`` keeps (when it exists) or a new file gets under the umask."""
    import stat

    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write, renamed to ``path`` when the block ends.

    A failed write (an exception, a full disk) removes the temporary file and leaves an existing
    ``path`` as it was; the rename replaces the old file in one step.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(handle)
    try:
        os.chmod(temporary, _new_file_mode(path))  # mkstemp's 0600 would make the result private
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_label_tiff(path: str | Path, labels: Any, **options: Any) -> None:
    """Write a label image as TIFF through a temporary file in the same folder (see `atomic_path`);
    ``options`` go to ``tifffile.imwrite`` (e.g. ``compression="zlib"``)."""
    import tifffile

    with atomic_path(path) as temporary:
        tifffile.imwrite(temporary, labels, **options)


def labels_from_masks(masks: Sequence[Any], shape: tuple[int, int]):
    """One label id per mask (1, 2, ...; later masks win where they overlap); uint16, or uint32 above 65535."""
    import numpy as np

    dtype = np.uint16 if len(masks) <= np.iinfo(np.uint16).max else np.uint32
    labels = np.zeros(shape, dtype=dtype)
    for label, mask in enumerate(masks, start=1):
        labels[np.asarray(mask, bool)] = label
    return labels


def write_table(path: Path | None, table: dict[str, Any] | None) -> None:
    """The per-object table as CSV, written to a temporary file and renamed (no half-written tables)."""
    if path is None:
        return
    import csv

    from .engine.measure import COLUMNS, empty_table, table_rows

    rows = table_rows(table if table is not None else empty_table())
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def instance_labels(reply, shape: tuple[int, int]):
    """One label image of all ``<SEG>`` s' objects: the k-th answer mask's objects follow the (k-1)-th's ids."""
    import numpy as np

    total = sum(int(labels.max()) for labels in reply.instances)
    out = np.zeros(shape, np.uint16 if total <= np.iinfo(np.uint16).max else np.uint32)
    tables, offset = [], 0
    for labels, table in zip(reply.instances, reply.tables, strict=True):
        free = (labels > 0) & (out == 0)
        out[free] = labels[free] + offset
        shifted = dict(table)
        shifted["label"] = table["label"] + offset
        tables.append(shifted)
        offset += int(labels.max())
    merged = {name: np.concatenate([t[name] for t in tables]) for name in tables[0]} if tables else None
    return out, merged
