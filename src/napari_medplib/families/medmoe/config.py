"""Med-MoE configuration, read from a released checkpoint's ``config.json`` (no torch here).

Med-MoE checkpoints are saved by the MoE-LLaVA code base: ``model_type`` is ``moe_llava_phi`` (Phi-2
base) or ``moe_llava_stablelm`` (StableLM-2 base), the LLaVA fields (``mm_image_tower``,
``image_projector_type`` ...) sit at the top level and the mixture-of-experts settings in a nested
``moe`` dict. Reading the config is cheap, so :func:`detect` can tell a Med-MoE folder from others
without loading any weights.

Values the reference ignores are ignored here too: the MoE layers are built with hard-coded capacity
factors and never drop tokens at inference, so ``moe.capacity_factor``, ``eval_capacity_factor`` and
``min_capacity`` have no effect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...model.config import CheckpointError

__all__ = ["MEDMOE_MODEL_TYPES", "MedMoECheckpointError", "MedMoEConfig", "detect"]

#: ``model_type`` of a Med-MoE (MoE-LLaVA) checkpoint -> base LLM family.
MEDMOE_MODEL_TYPES = {"moe_llava_phi": "phi", "moe_llava_stablelm": "stablelm"}
IMAGE_TOKEN_INDEX = -200
PROJECTOR_TYPES = ("linear", "identity")  # plus "mlp{N}x_gelu"


class MedMoECheckpointError(CheckpointError):
    """A folder is not a (complete, supported) Med-MoE checkpoint; the message says what to fix."""


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise MedMoECheckpointError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise MedMoECheckpointError(f"{folder} has no config.json; it is not a model folder (or the download is incomplete)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MedMoECheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise MedMoECheckpointError(f"{path} does not hold a JSON object")
    return data


def detect(folder: str | Path) -> bool:
    """True when ``folder``'s config.json says Med-MoE (a MoE-LLaVA Phi/StableLM model with MoE on).

    Never raises for an unreadable or foreign folder: the engine asks every family in turn.
    """
    try:
        data = _read_config_json(Path(folder))
    except MedMoECheckpointError:
        return False
    moe = data.get("moe")
    return data.get("model_type") in MEDMOE_MODEL_TYPES and isinstance(moe, dict) and bool(moe.get("moe_enable", True))


@dataclass
class MedMoEConfig:
    """What the model needs from ``config.json``; field names follow the released file."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str
    layer_norm_eps: float
    partial_rotary_factor: float
    rope_theta: float
    max_position_embeddings: int
    qk_layernorm: bool = False
    use_qkv_bias: bool = True  # StableLM only (Phi always has q/k/v biases)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # LLaVA side
    mm_image_tower: str = "openai/clip-vit-large-patch14-336"
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    # MoE side (``moe`` dict)
    moe_layers_idx: list[int] = field(default_factory=list)
    num_experts: list[int] = field(default_factory=list)
    top_k_experts: int = 1
    #: Set by the loader from the weights: Med-MoE has both; plain MoE-LLaVA has neither.
    router_bias: bool = True
    meta_expert: bool = True
    #: CLIP vision config (``CLIPVisionConfig`` fields), filled by the loader from the tower folder.
    vision_config: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """``"phi"`` or ``"stablelm"``."""
        return MEDMOE_MODEL_TYPES[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers_idx

    def experts_of(self, layer_idx: int) -> int:
        """Number of routed experts of MoE layer ``layer_idx``."""
        return self.num_experts[self.moe_layers_idx.index(layer_idx)]

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MedMoEConfig:
        folder = Path(folder)
        return cls.from_dict(_read_config_json(folder), source=str(folder / "config.json"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> MedMoEConfig:
        """Validate a released config; every problem is reported with the field and what to do."""

        def fail(message: str) -> MedMoECheckpointError:
            return MedMoECheckpointError(f"{source}: {message}")

        model_type = data.get("model_type")
        if model_type not in MEDMOE_MODEL_TYPES:
            raise fail(
                f"model_type is {model_type!r}, not a Med-MoE checkpoint (expected one of "
                f"{', '.join(MEDMOE_MODEL_TYPES)}); a dense stage-2 model or another family needs its own loader"
            )
        moe = data.get("moe")
        if not isinstance(moe, dict):
            raise fail("has no 'moe' dict; Med-MoE checkpoints keep their MoE settings there")
        if not moe.get("moe_enable", True):
            raise fail("moe.moe_enable is false: this is a dense model, not a Med-MoE checkpoint")

        def need(key: str, kind: type | tuple[type, ...], where: dict[str, Any] = data, default: Any = ...) -> Any:
            if key not in where:
                if default is not ...:
                    return default
                raise fail(f"missing field {key!r}")
            value = where[key]
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise fail(f"field {key!r} = {value!r} should be {getattr(kind, '__name__', kind)}")
            return value

        base = MEDMOE_MODEL_TYPES[model_type]
        hidden = need("hidden_size", int)
        heads = need("num_attention_heads", int)
        layers = need("num_hidden_layers", int)
        if hidden <= 0 or heads <= 0 or layers <= 0 or hidden % heads:
            raise fail(f"hidden_size {hidden} must be a positive multiple of num_attention_heads {heads}")
        kv_heads = need("num_key_value_heads", int, default=heads) or heads
        if heads % kv_heads:
            raise fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        # StableLM-2's own (remote-code) config spells two fields differently.
        eps = data.get("layer_norm_eps", data.get("norm_eps", 1e-5))
        rotary = data.get("partial_rotary_factor", data.get("rope_pct", 0.5 if base == "phi" else 0.25))
        if not 0 < float(rotary) <= 1:
            raise fail(f"partial_rotary_factor {rotary} must be in (0, 1]")
        rope_scaling = data.get("rope_scaling")
        if rope_scaling not in (None, {}):
            raise fail(f"rope_scaling {rope_scaling!r} is not supported (the released models use none)")
        if base == "stablelm" and data.get("use_parallel_residual", False):
            raise fail("use_parallel_residual is not supported for StableLM bases (StableLM-2 is sequential)")

        layers_idx = need("moe_layers_idx", list, moe)
        num_experts = need("num_experts", (list, int), moe)
        if isinstance(num_experts, int):
            num_experts = [num_experts] * len(layers_idx)
        if not layers_idx or not all(isinstance(i, int) and 0 <= i < layers for i in layers_idx):
            raise fail(f"moe.moe_layers_idx {layers_idx} must list layer indices in [0, {layers})")
        if len(set(layers_idx)) != len(layers_idx):
            raise fail(f"moe.moe_layers_idx {layers_idx} repeats a layer")
        if len(num_experts) != len(layers_idx) or not all(isinstance(n, int) and n >= 1 for n in num_experts):
            raise fail(f"moe.num_experts {num_experts} must give a positive count for each of the {len(layers_idx)} MoE layers")
        top_k = need("top_k_experts", int, moe, default=1)
        if top_k not in (1, 2):
            raise fail(f"moe.top_k_experts = {top_k}: the reference gate supports top-1 and top-2 only")
        if any(top_k > n for n in num_experts):
            raise fail(f"moe.top_k_experts = {top_k} exceeds the number of experts {min(num_experts)}")
        if moe.get("use_residual", False):
            raise fail("moe.use_residual (residual MoE) is not supported; the released Med-MoE models do not use it")

        projector = need("image_projector_type", str, default=data.get("mm_projector_type", "mlp2x_gelu"))
        if projector not in PROJECTOR_TYPES and not _mlp_depth(projector):
            raise fail(f"image_projector_type {projector!r} is not supported (linear, identity, mlp<N>x_gelu)")
        if data.get("mm_use_im_start_end") or data.get("mm_use_im_patch_token"):
            raise fail("mm_use_im_start_end / mm_use_im_patch_token are not supported (Med-MoE sets both false)")
        select = need("mm_vision_select_feature", str, default="patch")
        if select not in ("patch", "cls_patch"):
            raise fail(f"mm_vision_select_feature {select!r} must be 'patch' or 'cls_patch'")
        tower = data.get("mm_image_tower") or data.get("mm_vision_tower")
        if not isinstance(tower, str) or not tower:
            raise fail("mm_image_tower is missing: Med-MoE names its CLIP tower there")

        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size", int),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            hidden_act=need("hidden_act", str, default="gelu_new" if base == "phi" else "silu"),
            layer_norm_eps=float(eps),
            partial_rotary_factor=float(rotary),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            max_position_embeddings=need("max_position_embeddings", int, default=2048),
            qk_layernorm=bool(data.get("qk_layernorm", False)),
            use_qkv_bias=bool(data.get("use_qkv_bias", True)),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            mm_image_tower=tower,
            mm_hidden_size=need("mm_hidden_size", int),
            mm_vision_select_layer=need("mm_vision_select_layer", int, default=-2),
            mm_vision_select_feature=select,
            image_projector_type=projector,
            image_aspect_ratio=str(data.get("image_aspect_ratio") or "pad"),
            moe_layers_idx=list(layers_idx),
            num_experts=list(num_experts),
            top_k_experts=top_k,
        )


def _mlp_depth(projector_type: str) -> int:
    """``mlp3x_gelu`` -> 3; 0 when the name is not of that form."""
    if projector_type.startswith("mlp") and projector_type.endswith("x_gelu"):
        middle = projector_type[3:-6]
        if middle.isdigit() and int(middle) >= 1:
            return int(middle)
    return 0
