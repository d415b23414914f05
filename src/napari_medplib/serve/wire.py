"""What travels between `RemoteSession` and the server: JSON-safe dicts, never pickle.

* Arrays (masks, instance labels, table columns): ``{"dtype", "shape", "data"}`` where ``data`` is
  base64 of zlib-compressed little-endian bytes; bool arrays are bit-packed first (an organ-sized
  mask is a few hundred bytes, where a coordinate list would be hundreds of kilobytes).
* Images: raw little-endian bytes in the body of one PUT, keyed by `image_id` (sha256 of dtype,
  shape and bytes), so an image is sent once and the server can check what it got.
* Regions, `Reply` and `SegmentResult`: plain fields plus packed arrays.

Decoding is strict (allowed dtypes only, sizes checked before decompressing, decompression
bounded), because the server decodes what any client sends.
"""

from __future__ import annotations

import base64
import hashlib
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..engine.errors import SessionInputError

#: Array dtypes accepted on the wire (numpy ``dtype.str``, little-endian).
DTYPES = frozenset({"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"})
#: Largest decoded array (bytes): far above a 16k x 16k label image's int32 bytes.
MAX_ARRAY_BYTES = 2**31


class WireError(SessionInputError):
    """Malformed data on the wire; one line saying what is wrong."""


# ---------------------------------------------------------------------------------- arrays
def little_endian(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian (the byte order of every machine numpy runs on today)."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def check_dtype(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"unsupported array dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return np.dtype(name)


def check_shape(shape: Any, ndims: Sequence[int] | None = None) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in shape
    ):
        raise WireError(f"an array shape must be a list of non-negative integers, got {shape!r}")
    if ndims is not None and len(shape) not in ndims:
        raise WireError(f"expected an array with {' or '.join(map(str, ndims))} dimensions, got shape {list(shape)}")
    return tuple(shape)


def pack_array(array: Any) -> dict[str, Any]:
    array = little_endian(np.asarray(array))
    raw = np.packbits(array, axis=None).tobytes() if array.dtype == bool else array.tobytes()
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(zlib.compress(raw, 1)).decode("ascii")}


def unpack_array(item: Any, ndims: Sequence[int] | None = None) -> np.ndarray:
    if not isinstance(item, dict) or not isinstance(item.get("data"), str):
        raise WireError("an array must be an object with dtype, shape and data")
    dtype = check_dtype(item.get("dtype"))
    shape = check_shape(item.get("shape"), ndims)
    count = math.prod(shape)
    size = (count + 7) // 8 if dtype == bool else count * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise WireError(f"array of shape {list(shape)} is too large")
    try:
        packed = base64.b64decode(item["data"], validate=True)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, size + 1)  # bounded: a zip bomb stops here
    except (ValueError, zlib.error):
        raise WireError("array data is not base64 of zlib-compressed bytes") from None
    if len(raw) != size or inflate.unconsumed_tail:
        raise WireError(f"array data holds {len(raw)} bytes, its shape {list(shape)} needs {size}")
    if dtype == bool:
        return np.unpackbits(np.frombuffer(raw, np.uint8), count=count).astype(bool).reshape(shape)
    return np.frombuffer(raw, dtype).reshape(shape).copy()


# ---------------------------------------------------------------------------------- images
def image_header(array: np.ndarray) -> tuple[str, tuple[int, ...]]:
    return array.dtype.str, tuple(int(s) for s in array.shape)


def image_id(array: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes: the image's name on the server (the client computes it,
    the server recomputes it from what arrived)."""
    dtype, shape = image_header(array)
    digest = hashlib.sha256(f"{dtype}:{','.join(map(str, shape))}\n".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def wire_image(image: Any) -> np.ndarray:
    """The array to upload: contiguous, little-endian, a supported dtype and 2 or 3 dimensions."""
    if image is None:
        raise SessionInputError("no image given; pass one 2-D plane as a numpy array")
    array = np.asarray(image)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    array = little_endian(array)
    check_dtype(array.dtype.str)
    check_shape(list(array.shape), (2, 3))
    return array


def parse_image_header(dtype: str | None, shape: str | None) -> tuple[np.dtype, tuple[int, ...]]:
    """Upload headers ``X-Medplib-Dtype`` / ``X-Medplib-Shape`` ("512,512") -> dtype, shape."""
    kind = check_dtype(dtype)
    try:
        dims = [int(s) for s in (shape or "").split(",")]
    except ValueError:
        raise WireError(f"X-Medplib-Shape must be integers separated by commas, got {shape!r}") from None
    dims_t = check_shape(dims, (2, 3))
    if any(s == 0 for s in dims_t):
        raise WireError(f"the image has no pixels (shape {dims})")
    return kind, dims_t


# ---------------------------------------------------------------------------------- regions
def pack_region(region: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": region.kind, "coords": np.asarray(region.coords, float).tolist(), "label": region.label,
        "positive": bool(region.positive), "source": region.source, "index": region.index,
        "image_shape": None if region.image_shape is None else list(region.image_shape), "span": int(region.span),
    }
    if region.kind == "mask":
        out["mask"] = pack_array(region._mask)
        out["offset"] = list(region._offset)
    return out


def unpack_region(item: Any):
    from ..regions import Region, RegionError

    if not isinstance(item, dict):
        raise WireError("each region must be an object with kind and coords")
    kind = item.get("kind")
    info: dict[str, Any] = {}
    for name, types in (("label", str), ("source", str), ("index", int)):
        value = item.get(name)
        if value is not None and not isinstance(value, types):
            raise WireError(f"region {name} must be a {types.__name__} or null")
        info[name] = value
    shape = item.get("image_shape")
    if shape is not None:
        info["image_shape"] = check_shape(shape, (2,))
    try:
        if kind == "mask":
            offset = check_shape(item.get("offset", [0, 0]), (2,))
            return Region.mask(unpack_array(item.get("mask"), (2,)), offset=offset, **info)
        coords = np.asarray(item.get("coords"), dtype=float)
        if coords.ndim != 2 or coords.shape[1:] != (2,) or not np.isfinite(coords).all() or len(coords) > 100_000:
            raise WireError("region coords must be a list of at most 100,000 finite [row, col] pairs")
        if kind == "point":
            span = item.get("span", 20)
            if not isinstance(span, int) or isinstance(span, bool):
                raise WireError("a point region's span must be an integer")
            return Region.point(*coords[0], positive=bool(item.get("positive", True)), span=span, **info)
        if kind == "box":
            return Region.box(*coords[0], *coords[1], **info)
        if kind in ("polygon", "path"):
            return getattr(Region, kind)(coords, **info)
    except (RegionError, TypeError, IndexError) as err:
        raise WireError(f"bad region: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    except ValueError as err:  # numpy conversions
        if isinstance(err, WireError):
            raise
        raise WireError(f"bad region: {str(err).splitlines()[0]}") from None
    raise WireError(f"unknown region kind {kind!r}; expected point, box, polygon, path or mask")


# ---------------------------------------------------------------------------------- results
def _pack_table(table: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if table is None else {name: pack_array(np.asarray(col)) for name, col in table.items()}


def _unpack_table(table: Any) -> dict[str, np.ndarray] | None:
    if table is None:
        return None
    return {str(name): unpack_array(col) for name, col in table.items()}


def pack_reply(reply: Any) -> dict[str, Any]:
    return {
        "text": reply.text, "masks": [pack_array(m) for m in reply.masks],
        "regions": [pack_region(r) for r in reply.regions], "question": reply.question, "model": reply.model,
        "finish_reason": reply.finish_reason, "timings": reply.timings, "expert_share": reply.expert_share,
        "expert_share_mean": reply.expert_share_mean, "warnings": list(reply.warnings),
        "empty_regions": [int(i) for i in reply.empty_regions], "mask_scores": [float(s) for s in reply.mask_scores],
        "token_ids": [int(i) for i in reply.token_ids], "image_key": reply.image_key,
        "instances": [pack_array(m) for m in reply.instances], "tables": [_pack_table(t) for t in reply.tables],
        "measured_count": reply.measured_count, "count_noun": reply.count_noun,
        "count_labels": None if reply.count_labels is None else pack_array(reply.count_labels),
        "model_text": getattr(reply, "model_text", None),
    }


def unpack_reply(data: dict[str, Any]):
    from ..engine.reply import Reply

    fields = dict(data)
    fields["masks"] = [unpack_array(m) for m in data["masks"]]
    fields["regions"] = [unpack_region(r) for r in data["regions"]]
    fields["instances"] = [unpack_array(m) for m in data["instances"]]
    fields["tables"] = [_unpack_table(t) for t in data["tables"]]
    fields["count_labels"] = None if data["count_labels"] is None else unpack_array(data["count_labels"])
    return Reply(**fields)


def pack_segment(result: Any) -> dict[str, Any]:
    best = next((i for i, m in enumerate(result.masks) if m is result.mask), None)
    return {
        "masks": [pack_array(m) for m in result.masks], "best": best,
        "mask": pack_array(result.mask) if best is None else None, "scores": [float(s) for s in result.scores],
        "timings": result.timings, "image_key": result.image_key, "table": _pack_table(result.table),
        "window": None if getattr(result, "window", None) is None else [int(v) for v in result.window],
    }


def unpack_segment(data: dict[str, Any]):
    from ..engine.window import WindowedSegmentResult

    masks = [unpack_array(m) for m in data["masks"]]
    mask = masks[data["best"]] if data.get("best") is not None else unpack_array(data["mask"])
    window = None if data.get("window") is None else tuple(int(v) for v in data["window"])
    return WindowedSegmentResult(mask, masks, list(data["scores"]), dict(data["timings"]), data["image_key"],
                                 table=_unpack_table(data["table"]), window=window)


def jsonable(value: Any) -> Any:
    """Options as JSON: numpy scalars/arrays and tuples to plain lists and numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value
