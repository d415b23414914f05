"""COCO run-length encoded masks (uncompressed and compressed), decoded without pycocotools.

COCO stores a mask of size (h, w) as run lengths over the pixels in column-major (Fortran) order,
alternating background and foreground and starting with background (a leading 0 when the first
pixel is foreground). The *compressed* form (``counts`` is a string) packs each run length into
characters of 5 data bits plus a continuation bit, offset by 48 (ASCII '0'); from the third run on,
each value is stored as the difference to the run two places earlier (pycocotools ``rleFrString``).

Limits (the declared ``size`` costs nothing in the file, so it is checked before any memory is
spent on it): a side of at most :data:`MAX_MASK_SIDE` pixels; :func:`rle_to_mask` builds the dense
mask only up to :data:`MAX_DENSE_PIXELS` pixels, while :func:`rle_boxes` (what the COCO reader
uses) needs memory in proportion to the number of runs, i.e. to the file, whatever the mask size.
A compressed run length may use at most :data:`MAX_RUN_CHUNKS` characters (65 bits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Largest height or width of an RLE mask (a whole-slide image at full resolution fits).
MAX_MASK_SIDE = 200_000
#: Largest mask :func:`rle_to_mask` decodes into a dense array (100 MB of booleans).
MAX_DENSE_PIXELS = 100_000_000
#: Longest run length in a compressed counts string, in 5-bit characters.
MAX_RUN_CHUNKS = 13


def decode_counts_string(counts: str) -> list[int]:
    """Compressed COCO RLE string -> list of run lengths."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = 0
        shift = 0
        more = True
        while more:
            if shift >= MAX_RUN_CHUNKS:
                raise ValueError(f"a run length in the RLE counts string is longer than {MAX_RUN_CHUNKS} characters")
            if position >= len(counts):
                raise ValueError("the RLE counts string ends in the middle of a run length")
            chunk = ord(counts[position]) - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"the RLE counts string has a character {counts[position]!r} outside '0'..'o'")
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


def rle_runs(segmentation: Mapping) -> tuple[list[int], int, int]:
    """Checked (run lengths, height, width) of a COCO RLE dict {'size': [h, w], 'counts': ...}."""
    size = segmentation["size"]
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise ValueError("RLE 'size' must be [height, width]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer() for v in size):
        raise ValueError(f"RLE 'size' must be two whole numbers, got {size!r}")
    height, width = (int(v) for v in size)
    if not (0 <= height <= MAX_MASK_SIDE and 0 <= width <= MAX_MASK_SIDE):
        raise ValueError(f"RLE size {height}x{width} is outside 0..{MAX_MASK_SIDE} pixels per side")
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        runs = decode_counts_string(counts)
    elif isinstance(counts, list):
        if not all(isinstance(c, int | float) and not isinstance(c, bool) and float(c).is_integer() for c in counts):
            raise ValueError("RLE 'counts' must be whole numbers")
        runs = [int(c) for c in counts]
    else:
        raise ValueError("RLE 'counts' must be a list of run lengths or a compressed string")
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(
            f"run lengths add up to {sum(runs)} pixels but the mask is {height}x{width} = {height * width}"
        )
    return runs, height, width


def rle_boxes(runs: Sequence[int], height: int, width: int) -> np.ndarray:
    """Foreground runs -> (K, 4) pixel-edge boxes [x0, y0, x1, y1] whose union is the mask.

    A column-major run covers a tail of one column, whole columns and a head of another: at most
    three boxes per run, so memory follows the number of runs, not the mask size.
    """
    if not runs or height == 0:
        return np.zeros((0, 4), np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.asarray(runs, dtype=np.int64))])
    start, stop = bounds[1:-1:2], bounds[2::2]
    fore = stop > start
    start, stop = start[fore], stop[fore]
    c0, r0 = np.divmod(start, height)
    c1, r1 = np.divmod(stop - 1, height)
    r1 = r1 + 1
    one = c0 == c1
    boxes = [np.stack([c0[one], r0[one], c0[one] + 1, r1[one]], axis=1)]
    many = ~one
    head_full = many & (r0 == 0)  # the run starts at the top of its first column
    tail_full = many & (r1 == height)
    first = many & ~head_full
    boxes.append(np.stack([c0[first], r0[first], c0[first] + 1, np.full(first.sum(), height)], axis=1))
    last = many & ~tail_full
    boxes.append(np.stack([c1[last], np.zeros(last.sum(), np.int64), c1[last] + 1, r1[last]], axis=1))
    full_from = np.where(head_full, c0, c0 + 1)[many]
    full_to = np.where(tail_full, c1 + 1, c1)[many]
    full = full_to > full_from
    boxes.append(
        np.stack([full_from[full], np.zeros(full.sum(), np.int64), full_to[full], np.full(full.sum(), height)], axis=1)
    )
    return np.concatenate(boxes).astype(np.int64)


def rle_to_mask(segmentation: dict) -> np.ndarray:
    """COCO RLE dict {'size': [h, w], 'counts': list or str} -> boolean (h, w) mask."""
    runs, height, width = rle_runs(segmentation)
    if height * width > MAX_DENSE_PIXELS:
        raise ValueError(
            f"an RLE mask of {height}x{width} pixels is larger than {MAX_DENSE_PIXELS:,} pixels; "
            "outline it with rle_boxes instead"
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
