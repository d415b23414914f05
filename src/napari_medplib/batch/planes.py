"""Read one plane of an item, whole or a window at a time, without loading the rest of the file.

Small planes go through `image_files.read_plane` (its size checks included). Planes above the run's
tile threshold, and OME-Zarr inputs, are opened lazily as zarr arrays (tifffile exposes a TIFF as a
zarr store), so a window of a 20,000 x 20,000 plane reads only the chunks under it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .options import MAX_TILED_PIXELS, ItemError


@dataclass(frozen=True)
class ZarrLayout:
    """Where an OME-Zarr image's full-resolution array is and what its axes are."""

    array_path: str  # inside the group ("0")
    axes: str  # e.g. "TCZYX"
    shape: tuple[int, ...]

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    @property
    def free_axes(self) -> list[tuple[str, int]]:
        return [(a, n) for a, n in zip(self.axes, self.shape, strict=True) if a not in "CYX" and n > 1]


def _ome_attributes(path: Path) -> dict[str, Any]:
    for name, inner in ((".zattrs", None), ("zarr.json", "attributes")):
        meta = path / name
        if meta.is_file():
            if meta.stat().st_size > 16 * 2**20:
                raise ItemError(f"{path.name}: its {name} is over 16 MiB; not an OME-Zarr image we read")
            document = json.loads(meta.read_text())
            document = document.get(inner, {}) if inner else document
            return document.get("ome", document)
    raise ItemError(f"{path.name}: not an OME-Zarr image (no .zattrs or zarr.json)")


def zarr_layout(path: Path) -> ZarrLayout:
    """The full-resolution array of an OME-Zarr image (multiscales level 0), or a plain zarr array."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        axes = "YX" if node.ndim == 2 else ("CYX" if node.ndim == 3 else None)
        if axes is None:
            raise ItemError(f"{path.name}: a {node.ndim}-D zarr array without OME metadata; "
                            "save it as OME-Zarr so its axes are known")
        return ZarrLayout("", axes, tuple(node.shape))
    attributes = _ome_attributes(path)
    scales = attributes.get("multiscales") or []
    if not scales or not scales[0].get("datasets"):
        raise ItemError(f"{path.name}: OME-Zarr without multiscales datasets")
    first = scales[0]
    array_path = str(first["datasets"][0]["path"])
    names = [str(a["name"] if isinstance(a, dict) else a).upper() for a in first.get("axes", [])]
    array = node[array_path]
    if not names:
        names = list("TCZYX"[-array.ndim:])
    if len(names) != array.ndim or "Y" not in names or "X" not in names:
        raise ItemError(f"{path.name}: axes {names} do not match its {array.ndim}-D array")
    return ZarrLayout(array_path, "".join(names), tuple(array.shape))


class PlaneReader:
    """One plane of an input: ``shape`` (H, W) and ``read(y0, y1, x0, x1, step)`` for windows.

    Channels: ``channel`` picks one; otherwise a channel axis becomes the last axis (the session
    composites channels as it does for the widget).
    """

    def __init__(self, path: str | Path, plane: dict[str, int], channel: int | None = None) -> None:
        self.path = Path(path)
        self.plane = plane
        self.channel = channel
        self._array, self._axes = self._open()
        self.shape = (self._array.shape[self._axes.index("Y")], self._array.shape[self._axes.index("X")])
        if self.shape[0] * self.shape[1] > MAX_TILED_PIXELS:
            raise ItemError(f"{self.path.name}: a {self.shape[0]} x {self.shape[1]} plane is over the "
                            f"{MAX_TILED_PIXELS:,}-pixel limit; crop or downsample it first")

    def _open(self):
        import zarr

        if self.path.is_dir():
            layout = zarr_layout(self.path)
            node = zarr.open(str(self.path), mode="r")
            array = node if not layout.array_path else node[layout.array_path]
            return array, layout.axes
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                axes = tif.series[0].axes.upper()
            store = tifffile.imread(self.path, aszarr=True, series=0, level=0)
        except Exception as exc:
            raise ItemError(f"{self.path.name}: not a readable TIFF ({type(exc).__name__}: {str(exc)[:160]})") from None
        return zarr.open(store, mode="r"), axes

    def read(self, y0: int = 0, y1: int | None = None, x0: int = 0, x1: int | None = None, step: int = 1) -> np.ndarray:
        """Pixels of the window [y0:y1:step, x0:x1:step]: (h, w) or (h, w, channels)."""
        index: list[Any] = []
        for axis, size in zip(self._axes, self._array.shape, strict=True):
            if axis == "Y":
                index.append(slice(y0, y1, step))
            elif axis == "X":
                index.append(slice(x0, x1, step))
            elif axis in ("C", "S"):
                index.append(slice(None) if self.channel is None else self.channel)
            else:
                index.append(int(self.plane.get(axis, 0)) if size > 1 else 0)
        data = np.asarray(self._array[tuple(index)])
        kept = [a for a, i in zip(self._axes, index, strict=True) if isinstance(i, slice)]
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a not in "YX"]
        data = np.transpose(data, order)
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return data


def read_small_plane(path: str | Path, plane: dict[str, int], channel: int | None) -> np.ndarray:
    """A whole plane of an ordinary image file or OME-Zarr image, as the single-image commands read it."""
    path = Path(path)
    if path.is_dir():
        return PlaneReader(path, plane, channel).read()
    from ..image_files import read_plane

    image, _ = read_plane(path, plane or None, channel)
    return image
