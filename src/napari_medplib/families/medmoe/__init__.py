"""Med-MoE (Phi-2 / StableLM-2 LLaVA with domain experts, a meta expert and a modality router).

Public surface for the engine's family adapter::

    from napari_medplib.families import medmoe
    medmoe.detect(folder)                       # config.json says Med-MoE (cheap, no torch)
    model = medmoe.load(folder, device="cpu", dtype="float32")
    text, ids, experts = model.generate(image, "What is the modality of this image?")

Names are imported lazily so that ``detect`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib

from .config import MedMoECheckpointError, MedMoEConfig, detect
from .fixture import medmoe_fixture_dir

_LAZY = {
    "load": "loading",
    "MedMoETokenizer": "loading",
    "MedMoEModel": "modeling",
    "MedMoEOutput": "modeling",
    "ExpertChoices": "modeling",
    "build_prompt": "preprocess",
    "prepare_image": "preprocess",
}

__all__ = [
    "ExpertChoices", "MedMoECheckpointError", "MedMoEConfig", "MedMoEModel", "MedMoEOutput", "MedMoETokenizer",
    "build_prompt", "detect", "load", "medmoe_fixture_dir", "prepare_image",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
