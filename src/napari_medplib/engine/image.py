"""One image plane -> what the model sees, and model outputs -> image pixels.

`ModelView` holds the RGB uint8 plane the encoders see (``imaging.to_model_rgb``), its content key
(the cache key) and the geometry needed to map prompts in and masks out. The caller's array is
never written to.

Very large planes (longest side above ``LARGE_SIDE``) are first reduced by an integer factor ``k``
(block mean) so that no full-resolution float copy is made; the model sees at most 336/256 px anyway.
Geometry stays exact: the reduced plane covers a frame of ``(H'k, W'k)`` image pixels, masks are
produced on that frame and cropped to ``(H, W)``. Masks are computed in row tiles so that memory
stays at one bool plane per mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..cache import content_key
from ..imaging import to_model_rgb

#: Planes whose longest side exceeds this are block-reduced before contrast and colour mapping.
LARGE_SIDE = 4096
#: Budget (bytes) for float32 mask logits at image resolution before tiling in rows.
MASK_TILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ModelView:
    rgb: np.ndarray  # (h, w, 3) uint8 RGB the encoders see (h = ceil(H / factor))
    key: str  # content key of ``rgb``
    image_hw: tuple[int, int]  # (H, W) of the caller's plane
    factor: int  # block reduction factor (1 for normal images)

    @property
    def frame_hw(self) -> tuple[int, int]:
        """Image-pixel size of the area the model sees ((H, W) unless the plane was reduced)."""
        return (self.rgb.shape[0] * self.factor, self.rgb.shape[1] * self.factor)


def _block_reduce(image: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks (edge blocks padded by edge values); float32 result, input untouched."""
    h, w = image.shape[:2]
    hp, wp = math.ceil(h / k) * k, math.ceil(w / k) * k
    rows = np.minimum(np.arange(hp), h - 1)
    cols = np.minimum(np.arange(wp), w - 1)
    out = np.zeros((hp // k, wp // k, *image.shape[2:]), np.float32)
    for dr in range(k):  # strided gathers: memory of one reduced plane at a time
        for dc in range(k):
            out += image[rows[dr::k]][:, cols[dc::k]].astype(np.float32)
    out /= k * k
    return out


def make_view(image, contrast_limits=None, rgb: bool | None = None) -> ModelView:
    """The plane as the model sees it (raises ``imaging.ImageInputError`` for unusable arrays)."""
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        from ..imaging import ImageInputError

        raise ImageInputError(
            f"expected one 2-D plane, (H, W) or (H, W, C), got an array of shape {array.shape}; "
            "choose the plane first (e.g. image[z])"
        )
    h, w = array.shape[:2]
    factor = max(1, math.ceil(max(h, w) / LARGE_SIDE))
    if factor > 1:
        if rgb is None:
            rgb = array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8
        reduced = _block_reduce(array if array.dtype != bool else array.astype(np.uint8), factor)
        if array.dtype == np.uint8 and contrast_limits is None:
            reduced = np.rint(reduced).astype(np.uint8)  # keep 8-bit pass-through semantics
        model_rgb = to_model_rgb(reduced, contrast_limits, rgb=rgb)
    else:
        model_rgb = to_model_rgb(array, contrast_limits, rgb=rgb)
    model_rgb = np.ascontiguousarray(model_rgb)
    model_rgb.setflags(write=False)
    return ModelView(model_rgb, content_key(model_rgb), (h, w), factor)


# ------------------------------------------------------------------------------------ regions
def region_grid_mask(region, view: ModelView) -> np.ndarray:
    """A region as a mask on the plane the model sees (image resolution, or reduced by ``factor``)."""
    if view.factor == 1:
        return region.to_mask(view.image_hw)
    crop, (r0, c0) = region.crop(view.image_hw)
    out = np.zeros(view.rgb.shape[:2], bool)
    rr, cc = np.nonzero(crop)
    out[(rr + r0) // view.factor, (cc + c0) // view.factor] = True
    return out


# -------------------------------------------------------------------------------------- masks
def sam_prompt_coords(points_yx: Sequence[Sequence[float]], view: ModelView, resize_hw, pad) -> np.ndarray:
    """Image (row, col) points -> SAM (x, y) in the padded 256 frame, (P, 2) float32."""
    from ..model.preprocess import image_to_sam_coords

    return image_to_sam_coords(np.asarray(points_yx, float), view.frame_hw, resize_hw, pad)


def sam_prompt_box(box_yxyx: Sequence[float], view: ModelView, resize_hw, pad) -> np.ndarray:
    from ..model.preprocess import image_to_sam_boxes

    return image_to_sam_boxes(np.asarray(box_yxyx, float)[None], view.frame_hw, resize_hw, pad)


def low_res_to_masks(
    low_res_logits, view: ModelView, resize_hw, pad, mode: str = "corrected", threshold: float = 0.1,
    tile_bytes: int = MASK_TILE_BYTES,
) -> list[np.ndarray]:
    """(N, 1|K, 64, 64) SAM logits -> N bool (H, W) masks via ``postprocess_masks``, tiled when large.

    Small planes take ``postprocess_masks`` whole (the documented path). Large ones are done mask by
    mask and band by band: the same separable interpolation restricted to a band of output rows.
    """
    from ..model.postprocess import masks_from_logits, postprocess_masks

    logits = low_res_logits.float().reshape(-1, 1, *low_res_logits.shape[-2:]).cpu()
    frame_h, frame_w = view.frame_hw
    h, w = view.image_hw
    if logits.shape[0] * frame_h * frame_w * 4 <= tile_bytes:
        full = postprocess_masks(logits, resize_hw, view.frame_hw, pad=pad, mode=mode)
        return [m[:h, :w].numpy().copy() for m in masks_from_logits(full, threshold)]
    rows_per_band = max(1, tile_bytes // (frame_w * 4 * 2))
    out = []
    for one in logits:
        mask = np.zeros((h, w), bool)
        for r0 in range(0, h, rows_per_band):
            r1 = min(h, r0 + rows_per_band)
            band = _band_logits(one[None], resize_hw, (frame_h, frame_w), pad, mode, r0, r1)
            mask[r0:r1] = masks_from_logits(band[0, :, :w], threshold).numpy()
        out.append(mask)
    return out


def _band_logits(logits, resize_hw, frame_hw, pad, mode, r0, r1):
    """Rows r0..r1 of ``postprocess_masks(logits, resize_hw, frame_hw, pad, mode)`` (N, r1-r0, W)."""
    from ..model.postprocess import _interpolation_matrix, _reference_crop

    if mode == "reference":
        kept = _reference_crop(logits, resize_hw)[:, 0]  # (N, h', w')
        rows = _interpolation_matrix(frame_hw[0], kept.shape[-2], kept.shape[-2] / frame_hw[0], 0.0,
                                     kept.dtype, kept.device)
        cols = _interpolation_matrix(frame_hw[1], kept.shape[-1], kept.shape[-1] / frame_hw[1], 0.0,
                                     kept.dtype, kept.device)
        return rows[r0:r1] @ kept @ cols.T
    if mode != "corrected":
        from .errors import SessionInputError

        raise SessionInputError(f"mask_mode must be 'corrected' or 'reference', got {mode!r}")
    low_h, low_w = logits.shape[-2:]
    size = 256
    sh, sw = size / low_h, size / low_w
    rows = _interpolation_matrix(frame_hw[0], low_h, resize_hw[0] / frame_hw[0] / sh, pad[0] / sh,
                                 logits.dtype, logits.device)
    cols = _interpolation_matrix(frame_hw[1], low_w, resize_hw[1] / frame_hw[1] / sw, pad[1] / sw,
                                 logits.dtype, logits.device)
    return rows[r0:r1] @ logits[:, 0] @ cols.T


def mask_to_low_res(mask: np.ndarray, view: ModelView, resize_hw, pad, size: int = 256, low: int = 64):
    """A bool prior (H, W) -> (1, 1, 64, 64) logits in SAM's padded frame (+-8 inside/outside)."""
    import torch
    from PIL import Image

    arr = np.asarray(mask).astype(bool)
    if view.factor > 1:
        arr = _block_reduce(arr.astype(np.uint8), view.factor) > 0.5
    resized = np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize((resize_hw[1], resize_hw[0]), Image.BILINEAR))
    frame = np.zeros((size, size), np.float32)
    frame[pad[0] : pad[0] + resize_hw[0], pad[1] : pad[1] + resize_hw[1]] = resized / 255.0
    stride = size // low
    pooled = frame.reshape(low, stride, low, stride).mean(axis=(1, 3))
    logits = (pooled * 2.0 - 1.0) * 8.0
    return torch.from_numpy(logits)[None, None]
