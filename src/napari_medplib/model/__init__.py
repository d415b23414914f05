"""MedPLIB in PyTorch: config, tokenizer, CLIP tower, region encoder, MoE LLaMA, SAM-Med2D, loading.

Names are imported lazily so that ``import napari_medplib.model.preprocess`` stays cheap.
"""

from __future__ import annotations

import importlib

from .._triton_guard import ensure_triton_loadable

# before anything here imports torch/transformers (see _triton_guard)
ensure_triton_loadable()

_EXPORTS = {
    "MedPLIBConfig": "config",
    "MoEConfig": "config",
    "CheckpointError": "config",
    "tiny_config": "config",
    "MedPLIBTokenizer": "tokenizer",
    "get_template": "tokenizer",
    "format_question": "tokenizer",
    "tokenize_prompt": "tokenizer",
    "encode_question": "tokenizer",
    "MoEFeedForward": "moe",
    "RoutingRecord": "moe",
    "moe_forward_reference": "moe",
    "GenerationConfig": "generation",
    "GenerationResult": "generation",
    "EmptyRegionWarning": "region_encoder",
    "MedPLIBModel": "medplib",
    "ImageFeatures": "medplib",
    "GroundingResult": "medplib",
    "PrefixCache": "medplib",
    "save_pretrained": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
