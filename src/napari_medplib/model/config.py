"""Configuration of the MedPLIB network, read from a released checkpoint's ``config.json``.

No torch here: the config can be read (and a folder checked) without loading any weights.
The field names follow the released config (LLaMA fields, LLaVA ``mm_*`` fields, the LISA
``out_dim``, MedPLIB's ``max_sample_point``) so that a round trip keeps the file recognisable.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_limits import config_problems

IMAGE_TOKEN_INDEX = -200
REGION_TOKEN_INDEX = -300
IGNORE_INDEX = -100
#: What a point ``<region>`` becomes (``MedPLIBConfig.point_region_mask``).
POINT_REGION_MASKS = ("square", "object")

#: The vision config of ``openai/clip-vit-large-patch14-336``; used when the released config
#: names that tower by an author-local path that does not exist here (the weights are in the
#: checkpoint anyway, only the architecture is needed).
CLIP_VIT_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}


class CheckpointError(ValueError):
    """A model folder or file is missing, incomplete or not a MedPLIB checkpoint."""


@dataclass
class MoEConfig:
    """The mixture-of-experts FFN used in the decoder layers.

    MedPLIB: 2 experts, top-1, bias-free fp32 router, all layers, no shared expert.
    Med-MoE: router with bias, an always-on shared ("meta") expert, every other layer.
    """

    num_experts: int = 2
    top_k: int = 1
    #: Decoder layers whose FFN is a MoE; ``None`` means every layer.
    moe_layers: list[int] | None = None
    #: Training capacity factor: capacity = max(ceil(k * tokens / experts * factor), min_capacity).
    capacity_factor: float = 1.5
    #: Used at inference only with ``eval_drop_tokens`` (DeepSpeed behaviour); by default no token is
    #: dropped at inference (see moe.py).
    eval_capacity_factor: float = 2.0
    eval_drop_tokens: bool = False
    min_capacity: int = 0
    #: Random token selection when an expert overflows in training (DeepSpeed ``use_rts``).
    use_rts: bool = True
    router_bias: bool = False
    #: Med-MoE's always-on meta expert, added unweighted to the routed output.
    shared_expert: bool = False
    #: Renormalise the chosen probabilities to sum to 1. ``None``: only when top_k > 1
    #: (DeepSpeed top-2/top-k); top-1 MedPLIB multiplies by the raw softmax probability.
    normalize_top_k: bool | None = None
    #: How the 2nd..k-th expert is picked: "argmax" (deterministic) or "gumbel" (DeepSpeed top-2
    #: adds Gumbel noise to the logits, even at eval, which makes its inference stochastic).
    second_expert_policy: str = "argmax"
    router_dtype: str = "float32"
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoE needs 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                f"num_experts={self.num_experts}"
            )
        if self.router_dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"router_dtype must be a float dtype name such as 'float32', got {self.router_dtype!r}")
        if self.second_expert_policy not in ("argmax", "gumbel"):
            raise ValueError(f"second_expert_policy must be 'argmax' or 'gumbel', got {self.second_expert_policy!r}")

    @property
    def renormalize(self) -> bool:
        return self.top_k > 1 if self.normalize_top_k is None else self.normalize_top_k

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layers is None or layer_idx in self.moe_layers

    @classmethod
    def from_released(cls, moe: dict[str, Any], num_layers: int) -> MoEConfig | None:
        """Read the released ``config.moe`` dict (MoE-LLaVA schema); ``None`` when MoE is off."""
        if not moe or not moe.get("moe_enable", True):
            return None
        layers = moe.get("moe_layers_idx")
        num_experts = moe.get("num_experts", 2)
        if isinstance(num_experts, list):
            if len(set(num_experts)) > 1:
                raise CheckpointError(f"config.moe.num_experts must be the same in every layer, got {num_experts}")
            num_experts = num_experts[0]
        layers = None if layers is None or sorted(layers) == list(range(num_layers)) else sorted(layers)
        return cls(
            num_experts=int(num_experts),
            top_k=int(moe.get("top_k_experts", 1)),
            moe_layers=layers,
            capacity_factor=float(moe.get("capacity_factor", 1.5)),
            eval_capacity_factor=float(moe.get("eval_capacity_factor", 2.0)),
            min_capacity=int(moe.get("min_capacity", 0)),
            router_bias=bool(moe.get("router_bias", False)),
            shared_expert=bool(moe.get("shared_expert", False)),
            router_aux_loss_coef=float(moe.get("router_aux_loss_coef", 0.0)),
        )

    def to_released(self, num_layers: int) -> dict[str, Any]:
        layers = list(range(num_layers)) if self.moe_layers is None else list(self.moe_layers)
        return {
            "moe_enable": True,
            "moe_mode": "dense" if self.moe_layers is None else "custom",
            "moe_layers_idx": layers,
            "num_experts": [self.num_experts] * len(layers),
            "top_k_experts": self.top_k,
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "min_capacity": self.min_capacity,
            "use_residual": False,
            "ep_size": 1,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_bias": self.router_bias,
            "shared_expert": self.shared_expert,
        }


@dataclass
class MedPLIBConfig:
    """Dimensions and switches of the whole network (LLM, CLIP tower, projectors, SEG head)."""

    # LLaMA decoder
    vocab_size: int = 32267
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    # Vision side (LLaVA fields)
    mm_vision_tower: str = "openai/clip-vit-large-patch14-336"
    vision_config: dict[str, Any] = field(default_factory=lambda: dict(CLIP_VIT_L14_336))
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = True
    # Regions (MedPLIB)
    region_fea_adapter: bool = True
    max_sample_point: int = 512
    #: Our extension (not in the released model): add the region's geometry to its token
    #: (``model.region_encoder``); weights ``region_encoder.geometry.*``.
    region_geometry: bool = False
    #: Std of the geometry MLP's output weights at initialisation (training from scratch only).
    #: 0.1 is the default; 0.5 made a run read left/right and trained the bundled model (docs/model-card.md).
    region_geometry_init_std: float = 0.1
    #: Which geometry features (``region_encoder.region_geometry``): 1 = the first 10 (checkpoints
    #: without the key); 2 adds log area and eccentricity (the bundled model since its sixth run).
    region_geometry_version: int = 1
    #: Our extension (not in the released model): a ``<SEG>`` about a region is decoded with that
    #: region's box or point as a SAM prompt next to the ``<SEG>`` token (``model.seg_prompts``).
    seg_region_prompts: bool = False
    #: Our extension (the released model and demo use "square"): what a clicked point stands for as a
    #: ``<region>``. "square": MedPLIB's (2*span+1)^2 square around it; "object": SAM-Med2D's mask of
    #: the object under the click (the point as a SAM prompt), the square where SAM finds nothing.
    point_region_mask: str = "square"
    #: Our extension (not in the released model): the model counts objects of these nouns ("nuclei",
    #: "cells", ...) with a small centre detector, and its image and region tokens carry the counts
    #: (``model.counter``); weights ``counter.*``. Empty: no counter (the released model).
    count_nouns: list[str] = field(default_factory=list)
    count_max: int = 40  # counts above it are read as it
    count_width: int = 32  # the detector's channels at stride 4 (twice that at strides 8 and 16)
    count_threshold: float = 0.5  # a heatmap peak above this probability is one object
    #: Our extension, set by fine-tuning (``train.finetune``): the 10th and 90th percentile extents
    #: (image pixels, longest box side) of the objects the model was adapted on. The engine keeps a
    #: click's estimated object extent inside it, so its crop holds the clicked object. Empty: no range.
    object_extent_range: list[float] = field(default_factory=list)
    # SEG head (LISA)
    out_dim: int = 256
    #: The folder the config was read from (for tokenizer and SAM paths); not serialised.
    folder: str | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.mm_projector_type not in ("linear", "mlp2x_gelu"):
            raise CheckpointError(f"mm_projector_type {self.mm_projector_type!r} is not supported (linear, mlp2x_gelu)")
        if self.point_region_mask not in POINT_REGION_MASKS:
            raise CheckpointError(
                f"point_region_mask must be one of {', '.join(POINT_REGION_MASKS)}, got {self.point_region_mask!r}"
            )
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"mm_vision_select_feature {self.mm_vision_select_feature!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Image tokens per image: (image_size / patch_size)^2, 576 for CLIP-336/14."""
        return (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2

    # ---------------------------------------------------------------- reading / writing
    @classmethod
    def from_pretrained_dict(cls, config_json: dict[str, Any], folder: str | Path | None = None) -> MedPLIBConfig:
        """Build from a released ``config.json`` dict; ``mm_vision_tower`` is resolved against ``folder``."""
        if not isinstance(config_json, dict):
            raise CheckpointError(f"config.json holds {type(config_json).__name__}, not an object of settings: "
                                  "re-download the model folder")
        check_model_config(config_json)  # sizes checked before anything is built
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if key not in config_json:
                raise CheckpointError(
                    f"config.json has no {key!r}: this is not a MedPLIB/LLaVA config (model_type="
                    f"{config_json.get('model_type')!r})"
                )
        n_layers = int(config_json["num_hidden_layers"])
        known = {f.name for f in dataclasses.fields(cls)} - {"moe", "vision_config", "folder"}
        kwargs = {k: v for k, v in config_json.items() if k in known}
        rope = config_json.get("rope_parameters") or {}
        if config_json.get("rope_scaling"):
            raise CheckpointError(f"rope_scaling {config_json['rope_scaling']!r} is not supported")
        kwargs["rope_theta"] = float(config_json.get("rope_theta", rope.get("rope_theta", 10000.0)))
        kwargs.setdefault("num_key_value_heads", config_json["num_attention_heads"])
        kwargs["moe"] = MoEConfig.from_released(config_json.get("moe") or {}, n_layers)
        tower = config_json.get("mm_vision_tower") or config_json.get("vision_tower") or cls.mm_vision_tower
        kwargs["mm_vision_tower"] = tower
        kwargs["vision_config"] = config_json.get("vision_config") or resolve_vision_config(tower, folder)
        kwargs["folder"] = str(folder) if folder is not None else None
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MedPLIBConfig:
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{path} does not exist: give the folder of a MedPLIB checkpoint (the one holding "
                "config.json, the tokenizer files and the model shards)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from None
        return cls.from_pretrained_dict(data, folder)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict in the released schema (plus our ``vision_config``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("moe", "folder")}
        out["vision_tower"] = self.mm_vision_tower
        out["model_type"] = "medplib_moe_llama"
        out["architectures"] = ["MedPLIBForCausalLM"]
        out["moe"] = self.moe.to_released(self.num_hidden_layers) if self.moe else {"moe_enable": False}
        return out


def tiny_config(**overrides: Any) -> MedPLIBConfig:
    """A few-hundred-kilobyte MedPLIB (random weights in tests; CPU, fp32 or bf16, milliseconds).

    Vocabulary 907 = the fixture tokenizer's 640 pieces + the 267 MedPLIB tokens, so it pairs with
    ``shared/fixtures/medplib-tiny-ref``'s tokenizer. CLIP keeps 336 px / patch 14 (576 image tokens).
    """
    values: dict[str, Any] = dict(
        vocab_size=907, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe=MoEConfig(num_experts=2, top_k=1), mm_vision_tower="clip", mm_hidden_size=16,
        vision_config={**CLIP_VIT_L14_336, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "projection_dim": 8},
        out_dim=256,
    )
    values.update(overrides)
    return MedPLIBConfig(**values)


def resolve_vision_config(tower: str, folder: str | Path | None) -> dict[str, Any]:
    """The CLIP vision config named by ``mm_vision_tower``: a folder (relative to the checkpoint
    folder, or absolute) holding a CLIP ``config.json``. The CLIP weights come from the checkpoint."""
    candidates = []
    if folder is not None:
        candidates.append(Path(folder) / tower)
        candidates.append(Path(folder) / Path(tower).name)  # author-local path, copied next to it
    candidates.append(Path(tower))
    for cand in candidates:
        cfg = cand / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            vision = data.get("vision_config", data)
            if data.get("model_type") not in (None, "clip", "clip_vision_model"):
                raise CheckpointError(f"{cfg} is a {data.get('model_type')!r} config, expected a CLIP config")
            keep = set(CLIP_VIT_L14_336)
            return {k: v for k, v in vision.items() if k in keep}
    if "clip-vit-large-patch14-336" in tower:
        warnings.warn(
            f"mm_vision_tower {tower!r} was not found; using the known CLIP ViT-L/14-336 architecture "
            "(the CLIP weights are read from the checkpoint itself).",
            stacklevel=3,
        )
        return dict(CLIP_VIT_L14_336)
    raise CheckpointError(
        f"the vision tower folder {tower!r} named by config.json 'mm_vision_tower' was not found "
        f"(looked in: {', '.join(str(c) for c in candidates)}). Fix: copy the CLIP folder (its config.json "
        "is enough) next to the checkpoint and set 'mm_vision_tower' to its relative name."
    )


def check_model_config(config: Any, where: str = "config.json") -> None:
    """Raise ``CheckpointError`` when a config.json dict declares sizes beyond :data:`CONFIG_LIMITS`."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where} must hold a JSON object, not a {type(config).__name__}")
    problems = config_problems(config, where)
    if problems:
        raise CheckpointError(
            f"{where} declares a model this program will not build: {'; '.join(problems[:5])}. "
            "The file is damaged or not a MedPLIB config; download the model folder again"
        )
