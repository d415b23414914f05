"""Llama3-Med (arXiv 2406.09454): Llama-3 with hierarchical multi-resolution (S2) CLIP image encoding.

    from napari_medplib.families import llama3med
    if llama3med.detect(folder):
        model = llama3med.load(folder, device="cpu", dtype="float32")
        text, ids = model.generate(image, "What is shown?", max_new_tokens=64)

``detect`` reads only ``config.json``; torch and transformers are imported on first use of anything
else. ``multiscale`` holds the reusable multi-scale encoding.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..._triton_guard import ensure_triton_loadable
from .config import detect

# before anything here imports torch/transformers (see _triton_guard)
ensure_triton_loadable()

_EXPORTS = {
    "Llama3MedConfig": "config",
    "Llama3MedCheckpointError": "config",
    "Llama3MedModel": "modeling",
    "Llama3MedOutput": "modeling",
    "Llama3MedGeneration": "modeling",
    "load": "modeling",
    "multiscale_encode": "multiscale",
    "MultiScaleOutput": "multiscale",
    "Llama3MedTokenizer": "processing",
    "build_llama3_prompt": "processing",
    "preprocess_image": "processing",
}

__all__ = [
    "Llama3MedCheckpointError", "Llama3MedConfig", "Llama3MedGeneration", "Llama3MedModel", "Llama3MedOutput",
    "Llama3MedTokenizer", "MultiScaleOutput", "build_llama3_prompt", "detect", "load", "multiscale_encode",
    "preprocess_image",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
