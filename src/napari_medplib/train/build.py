"""Building the model a stage trains: from scratch, from earlier stages (MoE experts), with LoRA.

Stage IV of MedPLIB starts a MoE model from two dense models: the base (attention, embeddings,
region adapter) from stage II, expert 0's FFN from stage III (grounding), expert 1's from stage II
(vision-language), the T-projector and mask decoder from stage III, and a new router. Here that is
``init_model(... init="vl", experts=["grounding", "vl"], copy={"grounding": ["text_hidden_fcs.*", "sam.*"]})``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from ..model.config import CLIP_VIT_L14_336, MedPLIBConfig, MoEConfig
from ..model.medplib import MedPLIBModel
from ..model.region_encoder import region_input_width, widen_geometry_weight
from .finetune_data import PEFT_HINT, peft_available
from .recipe import LoraSpec, ModelSpec, RecipeError

_DENSE_FFN = re.compile(r"^(language_model\.layers\.\d+\.mlp\.)(gate_proj|up_proj|down_proj)\.(weight)$")
_EXPERT_FFN = re.compile(r"^(language_model\.layers\.\d+\.mlp\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight)$")


def build_config(spec: ModelSpec, tokenizer_folder: Path, vocab_size: int, moe: bool,
                 point_region_mask: str = "") -> MedPLIBConfig:
    """The MedPLIB config of a from-scratch model (CLIP keeps 336 px / patch 14: 576 image tokens);
    ``point_region_mask`` overrides the spec's (a stage's own choice)."""
    return MedPLIBConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=2048,
        moe=MoEConfig(num_experts=spec.num_experts, top_k=1, capacity_factor=spec.capacity_factor) if moe else None,
        mm_vision_tower="clip", mm_hidden_size=spec.clip_hidden_size,
        vision_config={**CLIP_VIT_L14_336, "hidden_size": spec.clip_hidden_size,
                       "intermediate_size": spec.clip_intermediate_size, "num_hidden_layers": spec.clip_layers,
                       "num_attention_heads": spec.clip_heads, "projection_dim": spec.clip_hidden_size},
        out_dim=spec.sam_prompt_dim, region_geometry=spec.region_geometry,
        region_geometry_init_std=spec.geometry_init_std, region_geometry_version=spec.geometry_version,
        seg_region_prompts=spec.seg_region_prompts, point_region_mask=point_region_mask or spec.point_region_mask,
        count_nouns=list(spec.count_nouns),
        folder=str(tokenizer_folder),
    )


def build_sam(spec: ModelSpec):
    from ..model.sam import SamMed2D
    from ..model.sam_encoder import SamMed2DConfig

    return SamMed2D.from_config(SamMed2DConfig(
        embed_dim=spec.sam_embed_dim, depth=spec.sam_depth, num_heads=spec.sam_heads,
        global_attn_indexes=(spec.sam_depth - 1,), adapter_hidden=spec.sam_adapter_hidden,
        out_chans=spec.sam_prompt_dim, prompt_embed_dim=spec.sam_prompt_dim,
        decoder_mlp_dim=spec.sam_decoder_mlp_dim, iou_head_hidden_dim=spec.sam_iou_hidden,
    ))


def build_model(spec: ModelSpec, tokenizer_folder: str | Path, moe: bool, seed: int = 0,
                point_region_mask: str = "") -> MedPLIBModel:
    """A randomly initialised MedPLIB (with SAM-Med2D and tokenizer) of the recipe's size."""
    from ..model.tokenizer import MedPLIBTokenizer

    tokenizer_folder = Path(tokenizer_folder)
    tokenizer = MedPLIBTokenizer.from_pretrained(tokenizer_folder)
    config = build_config(spec, tokenizer_folder, len(tokenizer), moe, point_region_mask)
    torch.manual_seed(seed)
    sam = build_sam(spec)
    model = MedPLIBModel.from_config(config, tokenizer=tokenizer, sam=sam, seed=seed + 1)
    if model.region_encoder is not None:
        model.region_encoder.on_empty = "zero"  # training data has tiny regions by design
    return model


def stage_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a finished stage, loaded through ``MedPLIBModel.from_pretrained`` (checks the folder)."""
    return MedPLIBModel.from_pretrained(folder).state_dict()


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def init_model(model: MedPLIBModel, init_state: dict[str, torch.Tensor] | None,
               experts: Sequence[dict[str, torch.Tensor]] = (),
               copies: Sequence[tuple[dict[str, torch.Tensor], Sequence[str]]] = (),
               reinit: Sequence[str] = ()) -> list[str]:
    """Fill ``model`` from earlier stages; returns the names left at their random init (e.g. routers).

    ``init_state``: every parameter with the same name and shape (a dense FFN goes to every expert
    when the model is MoE and ``experts`` is empty), except those matching ``reinit``;
    ``experts[e]``: the dense FFN of a stage for expert e; ``copies``: (state, patterns) applied last.
    """
    own = model.state_dict()
    filled: dict[str, torch.Tensor] = {}
    if init_state is not None and _num_experts(model) == 0 and any(_EXPERT_FFN.match(k) for k in init_state):
        raise RecipeError("the stage starts from a mixture-of-experts stage but builds a dense FFN, whose "
                          "weights would start random: set moe = true in the stage (the dense FFN of a MoE "
                          "stage is not defined)")

    def take(state: dict[str, torch.Tensor], only: Callable[[str], bool] = lambda k: True) -> None:
        for key, value in state.items():
            match = _DENSE_FFN.match(key)
            if match and key not in own:  # dense FFN into a MoE model: every expert (or the chosen ones)
                prefix, proj, kind = match.groups()
                targets = [f"{prefix}experts.{e}.{proj}.{kind}" for e in range(_num_experts(model))]
                if experts:
                    continue  # experts come from their own stages below
            else:
                targets = [key]
            for target in targets:
                if target in own and only(target):
                    if target == GEOMETRY_INPUT and _widens(value, own[target]):
                        value = widen_geometry_weight(value, own[target].shape[1])  # a newer geometry_version
                    if own[target].shape != value.shape:
                        raise RecipeError(f"cannot initialise {target}: shape {tuple(value.shape)} in the earlier "
                                          f"stage, {tuple(own[target].shape)} here (the recipe changed the model size? a stage "
                                           "that changes it lists the resized parts in 'reinit')")
                    filled[target] = value

    if init_state is not None:
        take(init_state, lambda k: not _matches(k, reinit))
    for e, state in enumerate(experts):
        for key, value in state.items():
            match = _DENSE_FFN.match(key)
            if match:
                prefix, proj, kind = match.groups()
                filled[f"{prefix}experts.{e}.{proj}.{kind}"] = value
            elif _EXPERT_FFN.match(key):
                raise RecipeError("an expert must come from a dense stage (moe = false)")
    for state, patterns in copies:
        take(state, lambda k, p=patterns: _matches(k, p))
    missing = model.load_state_dict(filled, strict=False).missing_keys
    return sorted(missing)


#: The region geometry MLP's input layer: a newer ``geometry_version`` widens it (`widen_geometry_weight`).
GEOMETRY_INPUT = "region_encoder.geometry.0.weight"


def _widens(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``new`` is a version-3 geometry input layer and ``old`` a version-2 one of the same width
    (version 3's input starts with version 2's; version 1's is laid out differently, so a stage going
    from 1 to 2 or 3 lists ``region_encoder.geometry.*`` in ``reinit``)."""
    return (old.ndim == new.ndim == 2 and old.shape[0] == new.shape[0]
            and old.shape[1] == region_input_width(2) and new.shape[1] == region_input_width(3))


def _num_experts(model: MedPLIBModel) -> int:
    return model.config.moe.num_experts if model.config.moe is not None else 0


# ----------------------------------------------------------------------------- freezing, LoRA
def set_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """requires_grad = name matches a pattern (LoRA factors always train); returns the trainable names."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(_matches(name, patterns) or "lora_" in name)
        if param.requires_grad:
            names.append(name)
    if not names:
        raise RecipeError(f"no parameter matches the stage's 'train' patterns {list(patterns)}")
    return names


def add_lora(model: MedPLIBModel, spec: LoraSpec) -> MedPLIBModel:
    """LoRA (peft) on the language model's Linear layers named in ``spec.targets`` (never CLIP/SAM/projector)."""
    if not peft_available():
        raise RecipeError(PEFT_HINT)
    from peft import LoraConfig, inject_adapter_in_model

    targets = "|".join(re.escape(t) for t in spec.targets)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=rf"^language_model\.layers\.\d+\..*({targets})$")
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base Linear and put the plain Linear back (our save layout)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
