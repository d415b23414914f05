"""A micro recipe shared by the training tests: the shipped tokenizer, a model of a few hundred kB."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from napari_medplib.train.recipe import RECIPES_DIR, Recipe, parse_recipe

MICRO_MODEL = {
    "tokenizer": str(RECIPES_DIR / "tokenizer"), "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 2,
    "clip_hidden_size": 16, "clip_intermediate_size": 32, "clip_layers": 1, "clip_heads": 2,
    "sam_embed_dim": 16, "sam_depth": 1, "sam_heads": 2, "sam_adapter_hidden": 4, "sam_prompt_dim": 32,
    "sam_decoder_mlp_dim": 32, "sam_iou_hidden": 16, "region_geometry": True,
}
LLM_TRAIN = ["language_model.*", "mm_projector.*", "region_encoder.*", "text_hidden_fcs.*", "sam.mask_decoder.*"]


def micro_data(data_folder: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"seed": 0, "n_per_task": 2, "size": 64, "turns_per_sequence": 3, "heldout_n": 2,
                            "styles": ["nuclei", "brightfield"]}
    if data_folder is not None:
        data["source"] = str(data_folder)
    return data


def micro_stages(steps: int = 3) -> list[dict[str, Any]]:
    common = {"steps": steps, "batch_size": 1, "warmup_steps": 0, "checkpoint_every": 2}
    return [
        {"name": "sam", "kind": "sam", "lr": 3e-3, "train": ["sam.*"], "instances_per_image": 2, **common},
        {"name": "regions", "tasks": ["region_vqa"], "image_tokens": False, "lr": 3e-3, "copy": {"sam": ["sam.*"]},
         "train": ["language_model.*", "mm_projector.*", "region_encoder.*"], **common},
        {"name": "vl", "tasks": ["region_vqa", "vqa"], "lr": 3e-3, "init": "regions",
         "train": ["language_model.*", "mm_projector.*", "region_encoder.*"], **common},
        {"name": "grounding", "tasks": ["grounding"], "lr": 3e-3, "init": "vl",
         "train": ["language_model.layers.*.mlp.*", "text_hidden_fcs.*", "sam.mask_decoder.*"],
         "loss": {"ce": 1.0, "bce": 1.0, "dice": 1.0}, **common},
        {"name": "moe", "tasks": ["grounding", "region_vqa", "vqa"], "moe": True, "lr": 3e-3, "init": "vl",
         "experts": ["grounding", "vl"], "copy": {"grounding": ["text_hidden_fcs.*", "sam.*"]},
         "train": ["language_model.layers.*.mlp.*", "text_hidden_fcs.*", "sam.mask_decoder.*"],
         "loss": {"ce": 1.0, "bce": 1.0, "dice": 1.0, "prompt_bce": 1.0, "prompt_dice": 1.0}, **common},
    ]


def micro_recipe(steps: int = 3, data_folder: Path | None = None, stages: list | None = None,
                 data_workers: int = 0) -> Recipe:
    return parse_recipe({"name": "micro", "seed": 0, "data_workers": data_workers, "model": dict(MICRO_MODEL),
                         "data": micro_data(data_folder),
                         "stages": copy.deepcopy(stages if stages is not None else micro_stages(steps))})
