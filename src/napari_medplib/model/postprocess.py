"""Low-resolution SAM mask logits -> mask logits and binary masks at image resolution.

Two modes:

* ``"corrected"`` (default): the 64x64 logits cover the centre-padded 256x256 SAM frame at 1/4
  resolution. Every output pixel centre is mapped through the real geometry (image -> resized image
  -> + centre padding -> /4) and the logits are sampled there bilinearly (half-pixel centres, edge
  clamping, like ``F.interpolate(..., align_corners=False)``). This is one resampling equivalent to
  SAM's "upsample to 256, remove the padding, resize to (H, W)" without the double blur, and it is
  right for every aspect ratio. For a square image it is the plain 64 -> (H, W) bilinear resize.
* ``"reference"``: MedPLIB's ``postprocess_masks`` bit for bit. It computes the padding as
  ``64 - resize`` (negative for any real image), slices the *un-upsampled* 64x64 map with Python's
  negative-index semantics and resizes what is left to (H, W). Square images come out right;
  elongated images keep a wrong band of the map (e.g. rows 32..63 for a 1:2 image) and are misplaced.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

Mode = Literal["corrected", "reference"]

#: The reference binarises with sigmoid(logit) > 0.1 (not 0.5, not logit > 0).
MASK_THRESHOLD = 0.1


def _check_low_res(low_res_logits: torch.Tensor) -> torch.Tensor:
    if low_res_logits.ndim == 3:
        low_res_logits = low_res_logits[:, None]
    if low_res_logits.ndim != 4 or low_res_logits.shape[1] != 1:
        raise ValueError(f"low_res_logits must be (N, 1, h, w) or (N, h, w), got {tuple(low_res_logits.shape)}")
    return low_res_logits


def _reference_crop(low_res_logits: torch.Tensor, resize_hw: tuple[int, int]) -> torch.Tensor:
    """The reference's slice of the 64x64 map, with Python slicing semantics for negative bounds."""
    size_h, size_w = low_res_logits.shape[-2:]
    pad_h, pad_w = size_h - resize_hw[0], size_w - resize_hw[1]
    top, left = pad_h // 2, pad_w // 2
    rows = slice(top, top + size_h - pad_h).indices(size_h)[:2]
    cols = slice(left, left + size_w - pad_w).indices(size_w)[:2]
    return low_res_logits[:, :, rows[0] : rows[1], cols[0] : cols[1]]


def reference_kept_band(resize_hw: tuple[int, int], low_res_size: int = 64) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns [start, stop) of the low-res map that the reference keeps (for diagnostics)."""
    probe = torch.zeros(1, 1, low_res_size, low_res_size)
    probe[0, 0] = torch.arange(low_res_size * low_res_size, dtype=torch.float32).view(low_res_size, low_res_size)
    kept = _reference_crop(probe, resize_hw)[0, 0]
    if kept.numel() == 0:
        return (0, 0), (0, 0)
    first, last = int(kept[0, 0]), int(kept[-1, -1])
    return (first // low_res_size, last // low_res_size + 1), (first % low_res_size, last % low_res_size + 1)


def _interpolation_matrix(out_size: int, in_size: int, scale: float, offset: float, dtype, device) -> torch.Tensor:
    """(out_size, in_size) linear-interpolation weights sampling input position ``(i + 0.5) * scale +
    offset - 0.5`` for output pixel i (input pixel centres at integer + 0.5), clamped to the edges."""
    positions = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale + offset - 0.5
    positions = positions.clamp(0, in_size - 1)
    low = positions.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = positions - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(dtype=dtype, device=device)


def _corrected(
    low_res_logits: torch.Tensor,
    resize_hw: tuple[int, int],
    original_hw: tuple[int, int],
    pad: tuple[int, int],
    input_size: int,
) -> torch.Tensor:
    low_h, low_w = low_res_logits.shape[-2:]
    if tuple(pad) == (0, 0) and tuple(resize_hw) == (input_size, input_size):
        # nothing to remove: the plain resize, numerically identical to the reference for square images
        return F.interpolate(low_res_logits.float(), original_hw, mode="bilinear", align_corners=False)[:, 0]
    stride_h, stride_w = input_size / low_h, input_size / low_w  # 256 / 64 = 4 input pixels per cell
    # output pixel i (centre i + 0.5) -> resized frame (i + 0.5) * rh / H -> padded frame + top -> / 4
    rows = _interpolation_matrix(
        original_hw[0], low_h, resize_hw[0] / original_hw[0] / stride_h, pad[0] / stride_h,
        torch.float32, low_res_logits.device,
    )  # (H, 64)
    cols = _interpolation_matrix(
        original_hw[1], low_w, resize_hw[1] / original_hw[1] / stride_w, pad[1] / stride_w,
        torch.float32, low_res_logits.device,
    )  # (W, 64)
    logits = low_res_logits[:, 0].float()  # (N, 64, 64)
    return rows @ logits @ cols.T  # (N, H, W)


def postprocess_masks(
    low_res_logits: torch.Tensor,
    resize_hw: tuple[int, int],
    original_hw: tuple[int, int],
    pad: tuple[int, int] | None = None,
    mode: Mode = "corrected",
    input_size: int = 256,
) -> torch.Tensor:
    """(N, 1, 64, 64) decoder logits -> (N, H, W) float32 mask logits at image resolution.

    ``resize_hw`` is the SAM resize (``SamInput.resize_hw``), ``pad`` its (top, left) centre padding
    (``SamInput.pad``; derived from ``resize_hw`` when omitted), ``original_hw`` the image's (H, W).
    """
    low_res_logits = _check_low_res(low_res_logits)
    resize_hw = (int(resize_hw[0]), int(resize_hw[1]))
    original_hw = (int(original_hw[0]), int(original_hw[1]))
    if min(resize_hw) <= 0 or min(original_hw) <= 0:
        raise ValueError(f"sizes must be positive, got resize_hw={resize_hw}, original_hw={original_hw}")
    if pad is None:
        pad = ((input_size - resize_hw[0]) // 2, (input_size - resize_hw[1]) // 2)
    if mode == "reference":
        kept = _reference_crop(low_res_logits.float(), resize_hw)
        return F.interpolate(kept, original_hw, mode="bilinear", align_corners=False)[:, 0]
    if mode == "corrected":
        return _corrected(low_res_logits, resize_hw, original_hw, (int(pad[0]), int(pad[1])), input_size)
    raise ValueError(f"mode must be 'corrected' or 'reference', got {mode!r}")


def masks_from_logits(mask_logits: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Binary masks as the reference makes them: ``sigmoid(logits) > threshold`` (bool, same shape)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
    return torch.sigmoid(mask_logits.float()) > threshold
