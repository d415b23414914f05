"""Microscopy image -> what the model sees: one RGB uint8 plane.

MedPLIB was trained on 8-bit RGB (or grey stored as RGB) medical images. Microscopy data is 8/16-bit or
float, with one to many channels and arbitrary intensity ranges, so the session maps it to RGB uint8:

* contrast by explicit limits (napari passes the layer's contrast limits) or by robust percentiles;
* one channel -> grey RGB; RGB(A) -> RGB; 2 or more fluorescence channels -> an additive composite in
  napari's default channel colours (magenta/green for two, cyan/magenta/yellow/... for more);
* 8-bit RGB or grey input without explicit limits passes through unchanged, so the released model sees
  exactly what the reference would.

The input array is never modified in place. numpy only: no torch, no napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Robust default contrast for non-8-bit data: these percentiles map to 0 and 255.
DEFAULT_PERCENTILES = (0.5, 99.5)

# napari's default colours for channel_axis images: MAGENTA_GREEN for two, CYMRGB otherwise.
_TWO_CHANNEL_COLOURS = ((1.0, 0.0, 1.0), (0.0, 1.0, 0.0))
_MANY_CHANNEL_COLOURS = (
    (0.0, 1.0, 1.0),
    (1.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
)

Limits = tuple[float, float]


class ImageInputError(ValueError):
    """The image cannot be turned into one 2-D plane for the model; the message says how to fix it."""


@dataclass(frozen=True)
class PlaneLayout:
    """How a 2-D (+channels) array is laid out: `rgb` colour image, or `channels` fluorescence channels."""

    height: int
    width: int
    channels: int  # 1 for grey
    rgb: bool


def describe_plane(image: np.ndarray, rgb: bool | None = None) -> PlaneLayout:
    """Check that `image` is one plane, (H, W) or (H, W, C) channels-last, and say how to read it.

    `rgb=None` guesses: a last axis of 3 or 4 with uint8 data is RGB(A), as napari guesses.
    """
    if image.ndim == 2:
        return PlaneLayout(image.shape[0], image.shape[1], 1, False)
    if image.ndim == 3:
        h, w, c = image.shape
        if c > 16 and min(h, w) <= 16:
            raise ImageInputError(
                f"image of shape {image.shape} looks channels-first; pass one plane as (H, W) or "
                "(H, W, C) with channels last (e.g. np.moveaxis(image, 0, -1))"
            )
        if c > 16:
            raise ImageInputError(
                f"image of shape {image.shape} has {c} values on its last axis; that looks like a "
                "stack, not channels: choose one plane (e.g. image[z]) before asking the model"
            )
        if rgb is None:
            rgb = c in (3, 4) and image.dtype == np.uint8
        if rgb and c not in (3, 4):
            raise ImageInputError(f"rgb=True needs 3 or 4 channels, the image has {c}")
        return PlaneLayout(h, w, c, bool(rgb))
    raise ImageInputError(
        f"expected one 2-D plane, (H, W) or (H, W, C), got an array of shape {image.shape}; "
        "choose the plane first (the napari widget and `medplib --plane/--channel` do this)"
    )


def _percentile_limits(values: np.ndarray, percentiles: Sequence[float]) -> Limits:
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(finite, percentiles)
    return (float(lo), float(hi))


def rescale_to_uint8(values: np.ndarray, limits: Limits) -> np.ndarray:
    """Map `limits` linearly to 0..255 (clipped). A zero-width range maps to 0 below/255 at or above."""
    lo, hi = float(limits[0]), float(limits[1])
    data = values.astype(np.float32, copy=True)
    np.nan_to_num(data, copy=False, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.where(data >= hi, 255, 0).astype(np.uint8)
    data -= lo
    data *= 255.0 / (hi - lo)
    np.clip(data, 0.0, 255.0, out=data)
    return np.rint(data).astype(np.uint8)


def _channel_limits(
    channel: np.ndarray,
    limits: Limits | None,
    percentiles: Sequence[float],
) -> Limits:
    if limits is not None:
        return (float(limits[0]), float(limits[1]))
    return _percentile_limits(channel, percentiles)


def to_model_rgb(
    image: np.ndarray,
    contrast_limits: Limits | Sequence[Limits] | None = None,
    *,
    rgb: bool | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Return the (H, W, 3) uint8 RGB image the model sees for one plane of microscopy data.

    `contrast_limits` is one (low, high) pair for the whole image, or one pair per channel of a
    multi-channel image; without it, 8-bit data passes through and other data is scaled by `percentiles`.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ImageInputError(f"image dtype {image.dtype} is not numeric; convert it to an integer or float array")
    layout = describe_plane(image, rgb)
    per_channel = _per_channel_limits(contrast_limits, layout.channels if not layout.rgb else 1)

    if layout.rgb:
        colour = image[..., :3]
        if per_channel[0] is None and colour.dtype == np.uint8:
            return colour.copy()
        limits = _channel_limits(colour, per_channel[0], percentiles)
        return rescale_to_uint8(colour, limits)

    if layout.channels == 1:
        plane = image if image.ndim == 2 else image[..., 0]
        if per_channel[0] is None and plane.dtype == np.uint8:
            grey = plane
        else:
            grey = rescale_to_uint8(plane, _channel_limits(plane, per_channel[0], percentiles))
        return np.repeat(grey[..., None], 3, axis=-1)

    colours = _TWO_CHANNEL_COLOURS if layout.channels == 2 else _MANY_CHANNEL_COLOURS
    composite = np.zeros((layout.height, layout.width, 3), dtype=np.float32)
    for c in range(layout.channels):
        channel = image[..., c]
        if per_channel[c] is None and channel.dtype == np.uint8:
            scaled = channel
        else:
            scaled = rescale_to_uint8(channel, _channel_limits(channel, per_channel[c], percentiles))
        composite += scaled[..., None].astype(np.float32) * np.asarray(colours[c % len(colours)], np.float32)
    np.clip(composite, 0, 255, out=composite)
    return np.rint(composite).astype(np.uint8)


def _per_channel_limits(
    contrast_limits: Limits | Sequence[Limits] | None, channels: int
) -> list[Limits | None]:
    if contrast_limits is None:
        return [None] * channels
    arr = np.asarray(contrast_limits, dtype=np.float64)
    if arr.shape == (2,):
        return [(float(arr[0]), float(arr[1]))] * channels
    if arr.shape == (channels, 2):
        return [(float(lo), float(hi)) for lo, hi in arr]
    raise ImageInputError(
        f"contrast_limits must be one (low, high) pair or one pair per channel ({channels}), "
        f"got shape {arr.shape}"
    )
