"""Large planes in tiles: grounding tile by tile, prompts in windows, labels written into OME-Zarr.

The model resizes whatever it is given to its encoders' few hundred pixels, so a 20,000-px plane is
asked about in tiles (``TILE_SIZE`` with ``TILE_OVERLAP``) that it sees at a useful scale. Memory
stays bounded: one tile of pixels and labels at a time; the plane's labels live on disk.

Stitching follows the "responsible tile" rule: each tile owns a core (its area up to the middle
of the overlaps with its neighbours), and an object is kept by the tile whose core holds its
centroid, pixels and all; objects wider than the overlap may be cut at a tile's edge. Ids are
unique across the plane (1..N in the order tiles are visited). Contrast is set once for the plane
from a strided overview, so every tile is seen with the same contrast.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .options import BatchOptions

#: Side of the overview read (strided) for the plane's contrast limits.
OVERVIEW_SIDE = 2048
#: A window around a prompt on a large plane: this many times the prompt's extent, at least MIN_WINDOW px.
WINDOW_FACTOR = 2.0
MIN_WINDOW = 256


@dataclass
class TiledResult:
    table: dict[str, np.ndarray]
    answer: str
    count: int
    tiles: int


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of side ``tile`` covering [0, size) with at least ``overlap`` px shared."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


def tile_cores(starts: Sequence[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Each tile's core [lo, hi): up to the middle of its overlap with each neighbour."""
    cores = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else (start + min(starts[i - 1] + tile, size)) // 2
        hi = size if i == len(starts) - 1 else (starts[i + 1] + min(start + tile, size)) // 2
        cores.append((lo, hi))
    return cores


class _LabelStore:
    """An OME-Zarr label image written under a temporary name and renamed into place when complete."""

    def __init__(self, dest: Path, shape: tuple[int, int], chunk: int) -> None:
        import zarr

        self.dest = dest
        self.temporary = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.temporary, ignore_errors=True)
        group = zarr.open_group(str(self.temporary), mode="w", zarr_format=2)
        self.array = group.create_array("0", shape=shape, chunks=(chunk, chunk), dtype="uint32", fill_value=0)
        group.attrs.update({
            "multiscales": [{
                "version": "0.4", "name": dest.stem,
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
            }],
            "image-label": {"version": "0.4", "source": {"image": "../../"}},
        })

    def paste(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """Write ``labels`` (ids already global) where the plane has no label yet."""
        h, w = labels.shape
        window = self.array[y0:y0 + h, x0:x0 + w]
        free = (window == 0) & (labels > 0)
        if free.any():
            window[free] = labels[free]
            self.array[y0:y0 + h, x0:x0 + w] = window

    def finish(self) -> None:
        if self.dest.exists():  # left by a run killed after the rename but before its record: ours to replace
            shutil.rmtree(self.dest)
        os.replace(self.temporary, self.dest)

    def discard(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)


def _overview_limits(reader) -> Any:
    from ..engine.stack import stack_contrast_limits

    step = max(1, -(-max(reader.shape) // OVERVIEW_SIDE))
    return stack_contrast_limits([reader.read(step=step)])


def _shift(table: dict[str, np.ndarray], dy: int, dx: int) -> dict[str, np.ndarray]:
    out = dict(table)
    for name in ("centroid_y", "bbox_y0", "bbox_y1"):
        out[name] = table[name] + dy
    for name in ("centroid_x", "bbox_x0", "bbox_x1"):
        out[name] = table[name] + dx
    return out


def _concat(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from ..engine.measure import empty_table

    if not tables:
        return empty_table()
    return {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}


def _intensity(pixels: np.ndarray) -> np.ndarray | None:
    return pixels if pixels.ndim == 2 or pixels.shape[-1] <= 4 else None


def ground_tiled(session: Any, reader, question: str, dest: Path, options: BatchOptions,
                 generation: dict[str, Any]) -> TiledResult:
    """Ask ``question`` with instances on every tile; stitch the objects into ``dest`` (OME-Zarr)."""
    from ..cli_io import instance_labels
    from ..engine.measure import measure

    height, width = reader.shape
    tile, overlap = options.tile_size, options.tile_overlap
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    y_cores, x_cores = tile_cores(ys, tile, height), tile_cores(xs, tile, width)
    limits = _overview_limits(reader)
    store = _LabelStore(dest, (height, width), tile)
    tables: list[dict[str, np.ndarray]] = []
    next_id, first_answer = 1, ""
    try:
        for y0, (cy0, cy1) in zip(ys, y_cores, strict=True):
            for x0, (cx0, cx1) in zip(xs, x_cores, strict=True):
                pixels = reader.read(y0, min(y0 + tile, height), x0, min(x0 + tile, width))
                reply = session.ask(pixels, question, instances=True, contrast_limits=limits, **generation)
                first_answer = first_answer or reply.text
                if not reply.instances:
                    continue
                labels, _ = instance_labels(reply, pixels.shape[:2])
                table = measure(labels.astype(np.int64))
                if not len(table["label"]):
                    continue
                cy, cx = table["centroid_y"] + y0, table["centroid_x"] + x0
                own = (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
                kept_ids = table["label"][own]
                relabel = np.zeros(int(labels.max()) + 1, np.uint32)
                relabel[kept_ids] = np.arange(next_id, next_id + len(kept_ids), dtype=np.uint32)
                global_labels = relabel[labels]
                next_id += len(kept_ids)
                store.paste(y0, x0, global_labels)
                if len(kept_ids):
                    measured = measure(global_labels.astype(np.int64), _intensity(pixels))
                    tables.append(_shift(measured, y0, x0))
        store.finish()
    except BaseException:
        store.discard()
        raise
    count = next_id - 1
    tiles = len(ys) * len(xs)
    answer = f"{count} objects in {tiles} tiles of {tile} px (first tile: {first_answer.strip()[:200]})"
    return TiledResult(_concat(tables), answer, count, tiles)


def _prompt_window(prompt: dict[str, Any], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    ys, xs = [], []
    if prompt.get("box") is not None:
        y0, x0, y1, x1 = prompt["box"]
        ys += [y0, y1]
        xs += [x0, x1]
    for y, x in prompt.get("points") or []:
        ys.append(y)
        xs.append(x)
    cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
    side = max(MIN_WINDOW, WINDOW_FACTOR * max(max(ys) - min(ys) + 1, max(xs) - min(xs) + 1))
    y0 = int(max(0, min(shape[0] - side, cy - side / 2)))
    x0 = int(max(0, min(shape[1] - side, cx - side / 2)))
    return y0, x0, int(min(shape[0], y0 + side)), int(min(shape[1], x0 + side))


def segment_windowed(session: Any, reader, prompts: Sequence[dict[str, Any]], dest: Path,
                     options: BatchOptions) -> dict[str, np.ndarray]:
    """Each prompt in a window around it, read from the file; label k = prompt k, in ``dest``."""
    from ..engine.measure import measure

    limits = _overview_limits(reader)
    store = _LabelStore(dest, reader.shape, options.tile_size)
    tables = []
    try:
        for label, prompt in enumerate(prompts, start=1):
            y0, x0, y1, x1 = _prompt_window(prompt, reader.shape)
            pixels = reader.read(y0, y1, x0, x1)
            local: dict[str, Any] = {}
            if prompt.get("box") is not None:
                by0, bx0, by1, bx1 = prompt["box"]
                local["box"] = (by0 - y0, bx0 - x0, by1 - y0, bx1 - x0)
            if prompt.get("points"):
                local["points"] = [(y - y0, x - x0) for y, x in prompt["points"]]
                local["point_labels"] = list(prompt["point_labels"])
            mask = session.segment(pixels, **local, contrast_limits=limits, window=None,
                                   mask_mode=options.mask_mode).mask
            labels = mask.astype(np.uint32) * label
            store.paste(y0, x0, labels)
            measured = measure(labels.astype(np.int64), _intensity(pixels))
            tables.append(_shift(measured, y0, x0))
        store.finish()
    except BaseException:
        store.discard()
        raise
    return _concat(tables)


def read_labels(path: Path) -> np.ndarray:
    """A batch label output (TIFF, or the OME-Zarr of a tiled plane) as an array (small outputs only)."""
    if path.is_dir():
        import zarr

        return np.asarray(zarr.open_group(str(path), mode="r")["0"][:])
    import tifffile

    return tifffile.imread(path)
