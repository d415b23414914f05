"""Med-MoE's image preprocessing, conversation template and prompt tokenisation, as the reference does them.

Two image paths exist in the reference and both are reproduced:

* ``"pad"`` (training, the interactive CLI, ``image_aspect_ratio: pad`` in the config): paste the image
  centred on a square of the CLIP mean colour, then run the CLIP processor.
* ``"crop"`` (the VQA evaluation script ``model_vqa_med.py``): the CLIP processor alone, which resizes
  the *shortest* side and centre-crops, so the sides of wide or tall images are lost.

The CLIP processor (transformers 4.37 ``CLIPImageProcessor``) resizes with PIL bicubic to
``shortest_edge`` (the long side becomes ``int(size * long / short)``), centre-crops with
``(h - crop) // 2`` offsets, rescales by 1/255 in float64, casts to float32 and normalises in float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...model.preprocess import CLIP_MEAN, CLIP_STD, to_rgb_uint8
from .config import IMAGE_TOKEN_INDEX

__all__ = [
    "IMAGE_PLACEHOLDER",
    "SYSTEM_PROMPT",
    "ClipProcessorSettings",
    "build_prompt",
    "prepare_image",
    "tokenize_prompt",
]

IMAGE_PLACEHOLDER = "<image>"
#: ``conv_templates["phi"]`` / ``["stablelm"]`` (identical text), separator style TWO.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "<|endoftext|>"
#: PIL resampling codes as stored in ``preprocessor_config.json``.
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclass(frozen=True)
class ClipProcessorSettings:
    """The CLIP processor settings of the tower folder's ``preprocessor_config.json``."""

    shortest_edge: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = 3  # bicubic

    @classmethod
    def from_file(cls, path: str | Path) -> ClipProcessorSettings:
        """Read the old OpenAI format (``"size": 336``) or the newer dict one (``{"shortest_edge": 336}``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the CLIP processor config {path}: {err}") from None
        size = data.get("size", 336)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", 336))
        crop = data.get("crop_size", size)
        if isinstance(crop, dict):
            crop = crop.get("height", size)
        mean = tuple(float(v) for v in data.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in data.get("image_std", CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{path}: image_mean and image_std must have 3 values")
        if not data.get("do_center_crop", True) or not data.get("do_resize", True):
            raise ValueError(f"{path}: only processors that resize and centre-crop (CLIP's) are supported")
        return cls(int(size), int(crop), mean, std, int(data.get("resample", 3)))  # type: ignore[arg-type]

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """``expand2square``'s background: ``int(255 * mean)`` per channel."""
        return tuple(int(255 * m) for m in self.mean)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- image
def expand_to_square(rgb: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """Centre the image on a square of ``colour`` (offset ``(long - short) // 2``), as ``expand2square``."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[...] = np.asarray(colour, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def shortest_edge_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: short side -> size."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = ({h}, {w})")
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def resize_and_crop(rgb: np.ndarray, settings: ClipProcessorSettings) -> np.ndarray:
    """(H, W, 3) uint8 -> (crop, crop, 3) uint8: shortest side to ``shortest_edge``, centre crop."""
    new_h, new_w = shortest_edge_hw(rgb.shape[0], rgb.shape[1], settings.shortest_edge)
    resample = _RESAMPLE.get(settings.resample, Image.BICUBIC)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=resample))
    crop = settings.crop_size
    if new_h < crop or new_w < crop:
        raise ValueError(f"crop_size {crop} is larger than the resized image {(new_h, new_w)}")
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return resized[top : top + crop, left : left + crop]


def normalise(rgb_uint8: np.ndarray, settings: ClipProcessorSettings) -> torch.Tensor:
    """(S, S, 3) uint8 -> [3, S, S] float32 (rescale in float64, cast, normalise in float32)."""
    rescaled = (rgb_uint8.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (rescaled - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def prepare_image(
    image: np.ndarray, settings: ClipProcessorSettings = ClipProcessorSettings(), mode: str = "pad"
) -> tuple[torch.Tensor, np.ndarray]:
    """A uint8 (H, W) or (H, W, 3|4) image -> (pixel_values [3, S, S] float32, pixels [3, S, S] uint8).

    ``mode`` is ``"pad"`` (expand to a mean-colour square first) or ``"crop"`` (shortest side + centre crop).
    """
    if mode not in ("pad", "crop"):
        raise ValueError(f"mode must be 'pad' or 'crop', got {mode!r}")
    rgb = to_rgb_uint8(image)
    if mode == "pad":
        rgb = expand_to_square(rgb, settings.pad_colour)
    pixels = resize_and_crop(rgb, settings)
    return normalise(pixels, settings), np.ascontiguousarray(pixels.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- prompt
def build_prompt(question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The ``phi``/``stablelm`` conversation: system, ``USER: <image>\\n{q}``, `` ASSISTANT:``.

    ``history`` holds earlier (question, answer) turns; the image goes with the first question, as
    the reference CLI does. A finished assistant turn ends with ``<|endoftext|>`` (separator style TWO).
    """
    turns = [*history, (question, None)]
    parts = [SYSTEM_PROMPT + SEP]
    for index, (user, answer) in enumerate(turns):
        user = user.replace(IMAGE_PLACEHOLDER, "")  # one image slot only
        if index == 0:
            user = f"{IMAGE_PLACEHOLDER}\n{user}"
        parts.append(f"{ROLES[0]}: {user}{SEP}")
        parts.append(f"{ROLES[1]}:" if answer is None else f"{ROLES[1]}: {answer}{SEP2}")
    return "".join(parts)


def tokenize_prompt(prompt: str, encode: Callable[[str], list[int]], bos_token_id: int | None = None) -> list[int]:
    """``tokenizer_image_token``: encode each chunk around ``<image>`` separately, -200 in between.

    When the tokenizer adds a BOS to every chunk, one BOS is kept at the start and the others dropped.
    """
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks and chunks[0] and bos_token_id is not None and chunks[0][0] == bos_token_id else 0
    ids: list[int] = [chunks[0][0]] if offset else []
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids
