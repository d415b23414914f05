"""Llama3-Med inputs: image preprocessing, the ``llama3`` chat template and tokenisation.

Everything here follows what the reference's evaluation path computes:

* **Image** (``CLIPImageProcessor`` with ``size``/``crop_size`` set to the largest scale, aspect ratio
  "square"): resize the *shortest* edge to S with PIL bicubic on the 8-bit image (long edge
  ``int(S * long / short)``), centre-crop S x S (the long edge loses its ends), x 1/255 in float64
  cast to float32, then (x - mean) / std in float32.
* **Template** ``llama3``: Llama-3 headers, the one-sentence system string (the reference's
  three-sentence string is three separate statements, so only the first counts, trailing space
  included). The reference's eval formatter ends the prompt with the literal assistant slot
  ``...assistant<|end_header_id|>\\n\\n{{content}}<|eot_id|>:``; ``reference_prompt=True`` reproduces that
  bug, the default ends the prompt right after the assistant header.
* **Tokens**: the prompt is split at ``<image>``, every chunk is tokenised on its own (each gets
  BOS), the first chunk keeps its BOS, later chunks lose their first token, and ``-200`` goes between
  chunks (so BPE merges never cross the image).
* **Decoding**: special tokens skipped, then the clean-up of transformers' slow/fast tokenizers of
  the reference's era (" ." -> "." ...), which newer transformers no longer applies to BPE models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...model.preprocess import CLIP_MEAN, CLIP_STD, to_rgb_uint8
from .config import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, Llama3MedCheckpointError

__all__ = [
    "ImageInput",
    "ImageSettings",
    "Llama3MedTokenizer",
    "build_llama3_prompt",
    "preprocess_image",
    "read_image_settings",
]

SYSTEM_PROMPT = "You are a helpful language and vision assistant. "
_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_EOT = "<|eot_id|>"
#: What the reference's eval formatter appends instead of a bare assistant header (see module doc).
_REFERENCE_GENERATION_SUFFIX = "{{content}}<|eot_id|>:"


# ----------------------------------------------------------------------------- image
@dataclass(frozen=True)
class ImageSettings:
    """Processor numbers: the size is the largest S2 scale; mean/std/resample from the CLIP processor."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = 3  # PIL bicubic


def read_image_settings(folder: Path, vision_name: str, size: int) -> ImageSettings:
    """Mean/std/resample from a ``preprocessor_config.json`` in the checkpoint folder or in the vision
    base folder it names (resolved against the checkpoint folder); OpenAI CLIP values otherwise (the
    DFN5B tower of the paper uses them too). The size is always the largest scale (the reference
    overwrites the processor's size and crop size with it)."""
    candidates = [folder / "preprocessor_config.json"]
    if vision_name:
        base = vision_name.split(":")[-1]
        candidates.append(folder / base / "preprocessor_config.json")
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise Llama3MedCheckpointError(f"cannot read the image processor config {path}: {err}") from None
            mean = tuple(float(v) for v in data.get("image_mean", CLIP_MEAN))
            std = tuple(float(v) for v in data.get("image_std", CLIP_STD))
            if len(mean) != 3 or len(std) != 3:
                raise Llama3MedCheckpointError(f"{path}: image_mean and image_std need 3 values each")
            return ImageSettings(size=size, mean=mean, std=std, resample=int(data.get("resample", 3)))
    return ImageSettings(size=size)


@dataclass(frozen=True)
class ImageInput:
    pixel_values: torch.Tensor  # [1, 3, S, S] float32, normalised
    crop_uint8: np.ndarray  # [3, S, S] uint8, resized and centre-cropped, channel first
    resized_hw: tuple[int, int]  # (h, w) after the shortest-edge resize
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def shortest_edge_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shortest edge to ``size``; the long edge is truncated, not rounded."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = ({h}, {w})")
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def preprocess_image(image: np.ndarray, settings: ImageSettings) -> ImageInput:
    """(H, W) or (H, W, 3|4) uint8 -> the processor output at the largest scale (see module doc)."""
    rgb = to_rgb_uint8(image)  # grey -> 3 equal channels, as PIL's convert("RGB")
    size = settings.size
    resized_hw = shortest_edge_hw(rgb.shape[0], rgb.shape[1], size)
    resized = np.asarray(
        Image.fromarray(rgb).resize((resized_hw[1], resized_hw[0]), Image.Resampling(settings.resample))
    )
    top, left = (resized_hw[0] - size) // 2, (resized_hw[1] - size) // 2
    crop = resized[top : top + size, left : left + size]  # (S, S, 3) uint8
    rescaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (rescaled - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    pixel_values = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]
    return ImageInput(
        pixel_values=pixel_values,
        crop_uint8=np.ascontiguousarray(crop.transpose(2, 0, 1)),
        resized_hw=resized_hw,
        crop_top_left=(top, left),
    )


# ----------------------------------------------------------------------------- template
def build_llama3_prompt(
    question: str,
    history: Sequence[tuple[str, str]] = (),
    *,
    system: str = SYSTEM_PROMPT,
    reference_prompt: bool = False,
) -> str:
    """The ``llama3`` prompt for ``history`` (question, answer) turns and a new ``question``.

    ``<image>`` stays where the text puts it; when no turn has one, it is put first in the first user
    turn followed by a newline, as in the training data. BOS is not part of the string (the tokenizer
    adds it).
    """
    turns = [(str(q), str(a)) for q, a in history] + [(str(question), None)]
    if not any(IMAGE_TOKEN in q for q, _ in turns):
        turns[0] = (f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1])
    parts = [_HEADER.format(role="system"), system, _EOT]
    for user, answer in turns:
        parts += [_HEADER.format(role="user"), user, _EOT, _HEADER.format(role="assistant")]
        if answer is not None:
            parts += [answer, _EOT]
        elif reference_prompt:
            parts.append(_REFERENCE_GENERATION_SUFFIX)
    return "".join(parts)


# ----------------------------------------------------------------------------- tokenizer
_CLEAN_UP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers' classic ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Llama3MedTokenizer:
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` library (no remote code, no hub).

    Encoding adds BOS through the file's post-processor, as the reference's fast tokenizer does; pad is
    EOS (``<|eot_id|>`` for Llama-3-Instruct), as the reference sets it after loading.
    """

    def __init__(
        self, tokenizer, eos_token: str, bos_token: str | None = None, clean_up_spaces: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise Llama3MedCheckpointError(f"the tokenizer has no token {eos_token!r} (its eos_token)")
        self.eos_token = eos_token
        self.eos_token_id = int(eos_id)
        bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.bos_token_id = int(bos_id) if bos_id is not None else None
        self.pad_token_id = self.eos_token_id
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_folder(cls, folder: str | Path, fallback: str | Path | None = None) -> Llama3MedTokenizer:
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``) from ``folder``, else from ``fallback``
        (the base LLM folder the config names, when it is a local folder)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        source = folder
        if not (folder / "tokenizer.json").is_file():
            if fallback is None or not (Path(fallback) / "tokenizer.json").is_file():
                raise Llama3MedCheckpointError(
                    f"{folder} has no tokenizer.json; the Llama-3 fast tokenizer file must be in the model folder "
                    "(copy tokenizer.json and tokenizer_config.json from the base Llama-3 model)"
                )
            source = Path(fallback)
        try:
            tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        except Exception as err:  # tokenizers raises its own Exception type for bad files
            raise Llama3MedCheckpointError(f"{source / 'tokenizer.json'} is not a valid tokenizer file: {err}") from None
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            path = source / name
            if path.is_file():
                try:
                    config.update(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError) as err:
                    raise Llama3MedCheckpointError(f"cannot read {path}: {err}") from None
        eos = _token_content(config.get("eos_token")) or "<|eot_id|>"
        bos = _token_content(config.get("bos_token")) or "<|begin_of_text|>"
        return cls(tokenizer, eos, bos, bool(config.get("clean_up_tokenization_spaces", True)))

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids with BOS (the file's post-processor adds it), special tokens recognised in the text."""
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids with ``-200`` for every ``<image>``: chunks tokenised separately, BOS kept once."""
        chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
        with_bos = bool(chunks[0]) and self.bos_token_id is not None and chunks[0][0] == self.bos_token_id
        offset = 1 if with_bos else 0
        ids: list[int] = [chunks[0][0]] if with_bos else []
        for index, chunk_ids in enumerate(chunks):
            if index:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += chunk_ids[offset:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text
