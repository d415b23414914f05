"""Image and region preprocessing exactly as the MedPLIB reference does it.

The reference (``ShawnHuang497/MedPLIB`` at ``9c3efe9``) prepares every image twice:

* **CLIP branch (336 px)**: resize the longest side to 336 with PIL bilinear, centre-pad the *uint8*
  image with the CLIP mean colour (122, 116, 104), then apply ``CLIPImageProcessor``'s rescale
  (1/255 in float64, cast to float32) and normalisation (float32).
* **SAM branch (256 px)**: resize the longest side to 256 with PIL bilinear, normalise in 0-255 space
  with the SAM mean/std, *then* centre-pad with 0.

Region masks follow the CLIP geometry and are reduced to the 24x24 patch grid with OpenCV's
``INTER_NEAREST`` (the top-left pixel of every 14x14 cell), reproduced here in numpy so OpenCV is not
needed. Centre padding everywhere puts ``pad // 2`` at the top/left and the remainder bottom/right.

Coordinates follow napari: (row, col) = (y, x), origin top-left. SAM's prompt encoder wants (x, y) in
the padded 256 frame; :func:`image_to_sam_coords` and :func:`image_to_sam_boxes` convert.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# CLIP ViT-L/14-336 processor constants (openai preprocessor_config.json).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 336
CLIP_PATCH = 14  # 336 / 14 = 24 patches per side

# SAM pixel statistics in 0-255 space.
SAM_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
SAM_SIZE = 256


@dataclass(frozen=True)
class ClipInput:
    """What the CLIP tower sees, plus the geometry needed to map back."""

    padded_uint8: np.ndarray  # (3, size, size) uint8, resized and centre-padded, channel first
    pixel_values: torch.Tensor  # (1, 3, size, size) float32, CLIP-normalised
    resize_hw: tuple[int, int]  # (h, w) after the longest-side resize
    pad: tuple[int, int]  # (top, left) padding offsets


@dataclass(frozen=True)
class SamInput:
    """What the SAM image encoder sees, plus the geometry needed to map back."""

    pixel_values: torch.Tensor  # (1, 3, size, size) float32, normalised then centre-padded with 0
    resize_hw: tuple[int, int]  # (h, w) after the longest-side resize ("resize_list" in the reference)
    pad: tuple[int, int]  # (top, left) padding offsets


@dataclass(frozen=True)
class RegionGrid:
    """A region mask on the CLIP frame and on the 24x24 patch grid."""

    mask_336: np.ndarray  # (336, 336) uint8 0/1, resized and centre-padded
    mask_24: np.ndarray  # (24, 24) uint8 0/1, one value per CLIP patch, [row, col]

    @property
    def n_cells(self) -> int:
        """Number of patch cells the region covers (0 means the region vanished)."""
        return int(self.mask_24.sum())


@dataclass(frozen=True)
class ClipSettings:
    """CLIP input size and normalisation, as the vision tower's processor config states them."""

    size: int = CLIP_SIZE
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def read_clip_settings(path: str | Path) -> ClipSettings:
    """Read size/mean/std from a CLIP ``preprocessor_config.json`` (a file or the folder holding it).

    Accepts the old OpenAI format (``"crop_size": 336``) and the newer dict format
    (``{"height": 336, "width": 336}`` or ``{"shortest_edge": 336}``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the CLIP processor config {path}: {error}") from None
    size = config.get("crop_size", config.get("size", CLIP_SIZE))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", CLIP_SIZE))
    mean = tuple(float(v) for v in config.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in config.get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{path}: image_mean and image_std must have 3 values, got {mean} and {std}")
    return ClipSettings(size=int(size), mean=mean, std=std)


# ----------------------------------------------------------------------------- geometry


def resize_longest_side_hw(h: int, w: int, target: int) -> tuple[int, int]:
    """Size after scaling the longest side to ``target`` (the reference's ``get_preprocess_shape``)."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = ({h}, {w})")
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def centre_pad_offsets(resize_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(top, left) padding that centres ``resize_hw`` in a ``size`` square (remainder bottom/right)."""
    return (size - resize_hw[0]) // 2, (size - resize_hw[1]) // 2


def _pil_resize(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of a uint8 (H, W) or (H, W, 3) array, as torchvision's PIL path does."""
    resized = Image.fromarray(array).resize((hw[1], hw[0]), Image.BILINEAR)
    return np.asarray(resized)


def _centre_pad(array: np.ndarray, size: int, value) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre-pad an (H, W[, C]) array to (size, size[, C]) with ``value`` (scalar or per channel)."""
    h, w = array.shape[:2]
    top, left = centre_pad_offsets((h, w), size)
    out = np.empty((size, size, *array.shape[2:]), dtype=array.dtype)
    out[...] = value
    out[top : top + h, left : left + w] = array
    return out, (top, left)


# ----------------------------------------------------------------------------- images


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An 8-bit image as the reference sees it after ``cv2.imread`` + BGR->RGB: (H, W, 3) uint8.

    Grey (H, W) or (H, W, 1) becomes three identical channels; an alpha channel is dropped. Contrast
    normalisation of 16-bit or float microscopy data is the engine's job and must happen before.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"to_rgb_uint8 expects a uint8 image, got dtype {array.dtype}; "
            "normalise the contrast to 8 bits first (the engine does this for 16-bit/float data)"
        )
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ValueError(
        f"to_rgb_uint8 expects (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}; "
        "pick one 2-D plane (and at most 4 channels, last) first"
    )


def _check_rgb(rgb_uint8: np.ndarray) -> np.ndarray:
    array = np.asarray(rgb_uint8)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {array.shape} dtype {array.dtype}; "
            "convert it with to_rgb_uint8() first"
        )
    return array


def prepare_clip_image(
    rgb_uint8: np.ndarray,
    size: int = CLIP_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> ClipInput:
    """CLIP input: longest side to ``size`` (PIL bilinear), centre-pad with the mean colour, normalise.

    ``mean``/``std`` come from the vision tower's ``preprocessor_config.json`` when the caller has it.
    The pad colour is ``int(255 * mean)`` per channel, as the reference computes it.
    """
    rgb = _check_rgb(rgb_uint8)
    resize_hw = resize_longest_side_hw(rgb.shape[0], rgb.shape[1], size)
    resized = _pil_resize(rgb, resize_hw)  # (h, w, 3) uint8
    pad_colour = np.array([int(255 * m) for m in mean], dtype=np.uint8)
    padded, pad = _centre_pad(resized, size, pad_colour)  # (size, size, 3) uint8

    # CLIPImageProcessor: rescale in float64 then cast to float32; normalise in float32.
    rescaled = (padded.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    normalised = (rescaled - mean32) / std32  # (size, size, 3) float32
    pixel_values = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]
    return ClipInput(
        padded_uint8=np.ascontiguousarray(padded.transpose(2, 0, 1)),
        pixel_values=pixel_values,
        resize_hw=resize_hw,
        pad=pad,
    )


def frame_brightness(clip: ClipInput) -> torch.Tensor:
    """[size, size] grey level in [0, 1] of what the CLIP tower sees (the mean of its 8-bit RGB), NaN in
    the padding: the brightness the version-3 region geometry compares regions with
    (``region_encoder.region_photometry``), measured on the image, never on the pad colour."""
    grey = torch.from_numpy(clip.padded_uint8.astype(np.float32).mean(axis=0) / 255)
    valid = torch.zeros_like(grey, dtype=torch.bool)
    (top, left), (h, w) = clip.pad, clip.resize_hw
    valid[top : top + h, left : left + w] = True
    return grey.masked_fill(~valid, float("nan"))


def prepare_sam_image(rgb_uint8: np.ndarray, size: int = SAM_SIZE) -> SamInput:
    """SAM-Med2D input: longest side to ``size`` (PIL bilinear), normalise (0-255 space), centre-pad 0."""
    rgb = _check_rgb(rgb_uint8)
    resize_hw = resize_longest_side_hw(rgb.shape[0], rgb.shape[1], size)
    resized = _pil_resize(rgb, resize_hw)  # (h, w, 3) uint8
    image = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()  # (3, h, w)
    mean = torch.tensor(SAM_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SAM_STD, dtype=torch.float32).view(3, 1, 1)
    normalised = (image - mean) / std
    top, left = centre_pad_offsets(resize_hw, size)
    pixel_values = torch.zeros((1, 3, size, size), dtype=torch.float32)
    pixel_values[0, :, top : top + resize_hw[0], left : left + resize_hw[1]] = normalised
    return SamInput(pixel_values=pixel_values, resize_hw=resize_hw, pad=(top, left))


# ----------------------------------------------------------------------------- regions


def region_mask_to_grid(mask: np.ndarray, size: int = CLIP_SIZE, patch: int = CLIP_PATCH) -> RegionGrid:
    """Reference region grid: 0/1 mask -> PIL-bilinear resize to the CLIP frame -> centre pad 0 ->
    OpenCV ``INTER_NEAREST`` by 1/patch, i.e. the top-left pixel of every ``patch`` x ``patch`` cell.

    ``mask`` is at image resolution; any nonzero value is inside (the reference maps values >= 1 to 1).
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"region mask must be 2-D (H, W), got shape {array.shape}")
    binary = (array != 0).astype(np.uint8)  # PIL bilinear on 0/1 values, as the reference does
    resize_hw = resize_longest_side_hw(binary.shape[0], binary.shape[1], size)
    resized = _pil_resize(binary, resize_hw)
    mask_336, _ = _centre_pad(resized, size, 0)
    n = size // patch
    mask_24 = np.ascontiguousarray(mask_336[: n * patch : patch, : n * patch : patch])
    return RegionGrid(mask_336=mask_336, mask_24=mask_24)


# ----------------------------------------------------------------------------- prompt coordinates


def image_to_sam_coords(
    yx: np.ndarray | Sequence[Sequence[float]],
    original_hw: tuple[int, int],
    resize_hw: tuple[int, int],
    pad: tuple[int, int],
) -> np.ndarray:
    """Image pixel (row, col) -> SAM prompt (x, y) in the centre-padded 256 input frame.

    Scaling follows SAM's ``ResizeLongestSide.apply_coords`` (coordinate times resized/original size);
    the prompt encoder itself adds the half-pixel shift. Then the centre-padding offsets are added.
    Accepts (..., 2) arrays; returns float32 (..., 2) in (x, y) order.
    """
    coords = np.asarray(yx, dtype=np.float64)
    if coords.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) as (row, col), got {coords.shape}")
    sy = resize_hw[0] / original_hw[0]
    sx = resize_hw[1] / original_hw[1]
    x = coords[..., 1] * sx + pad[1]
    y = coords[..., 0] * sy + pad[0]
    return np.stack([x, y], axis=-1).astype(np.float32)


def image_to_sam_boxes(
    boxes_yxyx: np.ndarray | Sequence[Sequence[float]],
    original_hw: tuple[int, int],
    resize_hw: tuple[int, int],
    pad: tuple[int, int],
) -> np.ndarray:
    """Image boxes (y0, x0, y1, x1) -> SAM boxes (x0, y0, x1, y1) in the padded 256 frame, (N, 4)."""
    boxes = np.asarray(boxes_yxyx, dtype=np.float64).reshape(-1, 4)
    corners = boxes.reshape(-1, 2, 2)  # (N, 2 corners, (y, x))
    return image_to_sam_coords(corners, original_hw, resize_hw, pad).reshape(-1, 4)
