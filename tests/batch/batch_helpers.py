"""Helpers of the batch tests (a module of its own: test modules import these names, and every test
folder has a conftest.py of its own)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def blobs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int = 6, value: int = 200) -> np.ndarray:
    """A uint8 plane with bright discs at ``centres`` on a dark background."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, 10, np.uint8)
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = value
    return image


class BlobSession:
    """A stand-in for `Session` whose grounding finds the bright discs (threshold + connected components).

    Batch logic (tiling, stitching, tables, resume) is checked against objects known in advance; the
    model's own quality is measured elsewhere.
    """

    model_name = "blobs"
    fingerprint = "blob-fingerprint"

    def __init__(self) -> None:
        self.asked: list[tuple[int, ...]] = []
        self.closed = False

    def ask(self, image, question, regions=(), *, instances=True, contrast_limits=None, **_):
        from skimage.measure import label

        from napari_medplib.engine.measure import measure

        plane = np.asarray(image)
        self.asked.append(plane.shape)
        labels = label(plane > 100).astype(np.int32)
        mask = labels > 0
        return SimpleNamespace(
            text="[SEG]" if instances else "a picture of discs", masks=[mask],
            instances=[labels] if instances else [], tables=[measure(labels)] if instances else [],
            measured_count=int(labels.max()) if instances else None,
        )

    def segment(self, image, points=None, point_labels=None, box=None, mask=None, **_):
        plane = np.asarray(image)
        out = np.zeros(plane.shape[:2], bool)
        if box is not None:
            y0, x0, y1, x1 = (int(round(v)) for v in box)
            out[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = plane[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] > 100
        return SimpleNamespace(mask=out)

    def close(self) -> None:
        self.closed = True
