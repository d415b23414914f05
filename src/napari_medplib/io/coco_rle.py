"""COCO run-length encoded masks (uncompressed and compressed), decoded without pycocotools.

COCO stores a mask of size (h, w) as run lengths over the pixels in column-major (Fortran) order,
alternating background and foreground and starting with background (a leading 0 when the first
pixel is foreground). The *compressed* form (``counts`` is a string) packs each run length into
characters of 5 data bits plus a continuation bit, offset by 48 (ASCII '0'); from the third run on,
each value is stored as the difference to the run two places earlier (pycocotools ``rleFrString``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def decode_counts_string(counts: str) -> list[int]:
    """Compressed COCO RLE string -> list of run lengths."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = 0
        shift = 0
        more = True
        while more:
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position += 1
            shift += 1
            if not more and chunk & 0x10:  # sign bit of the last chunk: negative number
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def encode_counts_string(runs: Sequence[int]) -> str:
    """Run lengths -> compressed COCO RLE string (inverse of :func:`decode_counts_string`)."""
    out = []
    for i, run in enumerate(runs):
        value = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not chunk & 0x10) or (value == -1 and chunk & 0x10))
            if more:
                chunk |= 0x20
            out.append(chr(chunk + 48))
    return "".join(out)


def rle_to_mask(segmentation: dict) -> np.ndarray:
    """COCO RLE dict {'size': [h, w], 'counts': list or str} -> boolean (h, w) mask."""
    height, width = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = decode_counts_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(
            f"run lengths add up to {sum(runs)} pixels but the mask is {height}x{width} = {height * width}"
        )
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((width, height)).T.copy()


def mask_to_runs(mask: np.ndarray) -> list[int]:
    """Boolean mask -> COCO run lengths (column-major, starting with background)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)
    return runs
