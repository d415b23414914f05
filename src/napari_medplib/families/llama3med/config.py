"""Llama3-Med configuration, read from a released checkpoint folder's ``config.json``.

No torch here: a folder can be recognised (:func:`detect`) and checked without loading weights.

The released ``config.json`` (``model_type`` "tinyllava", or "llama3med" in the later export) stores
``text_config`` and ``vision_config`` as *diffs* against the transformers class defaults (what
``to_diff_dict`` writes), so a value equal to the ``LlamaConfig`` / ``CLIPVisionConfig`` default is
simply absent. The reference rebuilds them with ``XConfig.from_dict(saved)``, i.e. class defaults plus
the stored keys; the defaults below are those of the transformers release the reference pins, written
out so that newer transformers defaults cannot change a loaded model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...model.config import CheckpointError

__all__ = ["Llama3MedConfig", "Llama3MedCheckpointError", "detect", "parse_scales"]

IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"

#: ``LlamaConfig`` defaults (transformers 4.45), the base the stored ``text_config`` diff applies to.
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # -> num_attention_heads
    "head_dim": None,  # -> hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}

#: ``CLIPVisionConfig`` defaults (transformers 4.45), the base of the stored ``vision_config`` diff.
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

#: The reference's S2 wrapper calls the tower's per-tile feature function without arguments, so these
#: defaults apply whatever ``vision_feature_layer`` / ``vision_feature_select_strategy`` say.
S2_FEATURE_LAYER = -2
S2_FEATURE_SELECT = "patch"  # CLS dropped

_MODEL_TYPES = ("tinyllava", "llama3med")
_CONNECTOR = re.compile(r"^mlp(\d+)x_gelu$")


class Llama3MedCheckpointError(CheckpointError):
    """A folder is not a loadable Llama3-Med checkpoint (missing file, bad config, unsupported part)."""


def parse_scales(value: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"378,756,1134"`` -> ``(378, 756, 1134)``, sorted ascending as the reference sorts them."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        scales = sorted(int(p) for p in parts)
    except (TypeError, ValueError):
        raise Llama3MedCheckpointError(f"s2_scales must be comma-separated integers, got {value!r}") from None
    if not scales or scales[0] <= 0:
        raise Llama3MedCheckpointError(f"s2_scales must list positive sizes, got {value!r}")
    return tuple(scales)


@dataclass
class Llama3MedConfig:
    """What the network needs, validated. ``text`` / ``vision`` are complete (defaults filled in)."""

    text: dict[str, Any]
    vision: dict[str, Any]
    scales: tuple[int, ...]
    connector_depth: int = 2  # mlp{N}x_gelu
    vision_hidden_size: int = 0  # vision width x number of scales
    image_aspect_ratio: str = "square"
    tokenizer_model_max_length: int = 4096
    vision_model_name_or_path: str = ""
    llm_model_name_or_path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def tile_size(self) -> int:
        """The smallest scale: the CLIP input size and the size of every tile."""
        return self.scales[0]

    @property
    def image_size(self) -> int:
        """The largest scale: images are resized and centre-cropped to it."""
        return self.scales[-1]

    @property
    def grid(self) -> int:
        """Patches per side of one tile (the base grid every scale is pooled to)."""
        return self.tile_size // int(self.vision["patch_size"])

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.text.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_folder(cls, folder: str | Path) -> Llama3MedConfig:
        """Read and check ``folder/config.json``; raises :class:`Llama3MedCheckpointError` with the fix."""
        folder = Path(folder)
        if not folder.is_dir():
            raise Llama3MedCheckpointError(f"model folder {folder} does not exist")
        path = folder / "config.json"
        if not path.is_file():
            raise Llama3MedCheckpointError(f"{folder} has no config.json; it is not a Llama3-Med checkpoint folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise Llama3MedCheckpointError(f"cannot read {path}: {err}") from None
        if not isinstance(raw, dict):
            raise Llama3MedCheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, folder)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], folder: Path | None = None) -> Llama3MedConfig:
        where = f"{folder / 'config.json'}" if folder is not None else "config.json"
        if raw.get("model_type") not in _MODEL_TYPES and "Llama3MedForConditionalGeneration" not in (
            raw.get("architectures") or []
        ):
            raise Llama3MedCheckpointError(
                f"{where}: model_type {raw.get('model_type')!r} is not a Llama3-Med config "
                f"(expected one of {_MODEL_TYPES} or architectures Llama3MedForConditionalGeneration)"
            )
        text_saved = raw.get("text_config")
        vision_saved = raw.get("vision_config")
        if not isinstance(text_saved, dict) or not isinstance(vision_saved, dict):
            raise Llama3MedCheckpointError(
                f"{where}: text_config and vision_config must both be present (the full fine-tune save writes "
                "them); this looks like a partial or pre-training checkpoint"
            )
        text_type = text_saved.get("model_type", "llama")
        if text_type != "llama":
            raise Llama3MedCheckpointError(
                f"{where}: text_config.model_type {text_type!r} is not supported; only Llama LLMs (Llama-3) are"
            )
        vision_type = vision_saved.get("model_type", "clip_vision_model")
        if vision_type != "clip_vision_model":
            raise Llama3MedCheckpointError(
                f"{where}: vision tower {vision_type!r} ({raw.get('vision_model_name_or_path')!r}) is not "
                "supported; only CLIP vision towers are (the timm H-optimus-0 variant is not)"
            )
        if raw.get("vision_model_name_or_path2"):
            raise Llama3MedCheckpointError(f"{where}: a second vision tower (vision_model_name_or_path2) is not supported")
        text = dict(LLAMA_DEFAULTS)
        text.update({k: v for k, v in text_saved.items() if k in LLAMA_DEFAULTS})
        if text["num_key_value_heads"] is None:
            text["num_key_value_heads"] = text["num_attention_heads"]
        if text["head_dim"] is None:
            text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
        vision = dict(CLIP_VISION_DEFAULTS)
        vision.update({k: v for k, v in vision_saved.items() if k in CLIP_VISION_DEFAULTS})

        scales_value = raw.get("s2_scales", vision_saved.get("s2_scales"))
        if scales_value in (None, ""):
            scales = (int(vision["image_size"]),)  # no S2 wrapper: one plain pass
        else:
            scales = parse_scales(scales_value)
        connector_type = raw.get("connector_type", "mlp2x_gelu")
        match = _CONNECTOR.match(str(connector_type))
        if match is None or int(match.group(1)) < 1:
            raise Llama3MedCheckpointError(
                f"{where}: connector_type {connector_type!r} is not supported (expected mlp<N>x_gelu, e.g. mlp2x_gelu)"
            )
        config = cls(
            text=text,
            vision=vision,
            scales=scales,
            connector_depth=int(match.group(1)),
            vision_hidden_size=int(raw.get("vision_hidden_size") or int(vision["hidden_size"]) * len(scales)),
            image_aspect_ratio=str(raw.get("image_aspect_ratio") or "square"),
            tokenizer_model_max_length=int(raw.get("tokenizer_model_max_length") or 4096),
            vision_model_name_or_path=str(raw.get("vision_model_name_or_path") or ""),
            llm_model_name_or_path=str(raw.get("llm_model_name_or_path") or ""),
            raw=raw,
        )
        config.validate(where)
        return config

    def validate(self, where: str = "config.json") -> None:
        """Check that the pieces fit together; the message says which numbers disagree."""
        t, v = self.text, self.vision
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(t[key], int) or t[key] <= 0:
                raise Llama3MedCheckpointError(f"{where}: text_config.{key} must be a positive integer, got {t[key]!r}")
        if t["num_attention_heads"] % t["num_key_value_heads"]:
            raise Llama3MedCheckpointError(
                f"{where}: text_config.num_attention_heads ({t['num_attention_heads']}) must be a multiple of "
                f"num_key_value_heads ({t['num_key_value_heads']})"
            )
        if v["hidden_size"] % v["num_attention_heads"]:
            raise Llama3MedCheckpointError(
                f"{where}: vision_config.hidden_size ({v['hidden_size']}) must be divisible by num_attention_heads "
                f"({v['num_attention_heads']})"
            )
        tile = self.tile_size
        bad = [s for s in self.scales if s % tile]
        if bad:
            raise Llama3MedCheckpointError(
                f"{where}: every s2 scale must be a multiple of the smallest ({tile}); {bad} are not"
            )
        if int(v["image_size"]) != tile:
            raise Llama3MedCheckpointError(
                f"{where}: vision_config.image_size ({v['image_size']}) must equal the smallest s2 scale ({tile}): "
                "every tile goes through the vision tower at that size"
            )
        if tile % int(v["patch_size"]):
            raise Llama3MedCheckpointError(
                f"{where}: the tile size {tile} is not a multiple of vision_config.patch_size ({v['patch_size']})"
            )
        expected = int(v["hidden_size"]) * len(self.scales)
        if self.vision_hidden_size != expected:
            raise Llama3MedCheckpointError(
                f"{where}: vision_hidden_size is {self.vision_hidden_size} but vision width {v['hidden_size']} x "
                f"{len(self.scales)} scales = {expected}"
            )
        if self.image_aspect_ratio not in ("square",):
            raise Llama3MedCheckpointError(
                f"{where}: image_aspect_ratio {self.image_aspect_ratio!r} is not supported (the released scripts "
                "use 'square': resize the shortest edge, centre crop)"
            )


def detect(folder: str | Path) -> bool:
    """True when ``folder`` looks like a Llama3-Med checkpoint (config only; weights are not opened)."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    architectures = raw.get("architectures") or []
    if "Llama3MedForConditionalGeneration" in architectures or raw.get("model_type") == "llama3med":
        return True
    # the TinyLLaVA-Factory base shares model_type "tinyllava"; Llama3-Med's marker is its S2 scales
    text = raw.get("text_config") or {}
    return (
        raw.get("model_type") == "tinyllava"
        and bool(raw.get("s2_scales"))
        and isinstance(text, dict)
        and text.get("model_type", "llama") == "llama"
    )
