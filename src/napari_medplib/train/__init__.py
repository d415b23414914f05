"""Training data and (elsewhere in this package) training: napari-free, torch-free data modules.

* `synth` — synthetic microscopy images with instance masks in five styles (`make_sample`,
  `make_dataset`, seeds of disjoint train/held-out splits via `sample_seed`);
* `conversations` — MeCoVQA-style grounding / region-VQA / VQA turns from masks (`make_conversations`);
* `annotations` — the same turns from a user's image + label image + class names;
* `datatypes` — the shared types (`Sample`, `RegionSpec`, `Conversation`, the tokens);
* `data` — the same types re-exported, `normalise_answer` for
  exact-match scoring, the on-disk format (`save_dataset`, `load_dataset`), and a synthetic split
  written in one call (`write_synthetic_dataset`; `synthetic_items` streams the same pairs).
"""

from __future__ import annotations

from .annotations import AnnotationError, conversations_from_annotations, sample_from_annotations
from .conversations import make_conversations
from .data import (
    REGION_TOKEN,
    SEG_TOKEN,
    Conversation,
    RegionSpec,
    Sample,
    SyntheticSample,
    TrainDataset,
    load_dataset,
    normalise_answer,
    save_dataset,
    synthetic_items,
    write_synthetic_dataset,
)
from .synth import STYLES, make_dataset, make_sample, sample_seed

__all__ = [
    "REGION_TOKEN",
    "SEG_TOKEN",
    "STYLES",
    "AnnotationError",
    "Conversation",
    "RegionSpec",
    "Sample",
    "SyntheticSample",
    "TrainDataset",
    "conversations_from_annotations",
    "load_dataset",
    "make_conversations",
    "make_dataset",
    "make_sample",
    "normalise_answer",
    "sample_from_annotations",
    "sample_seed",
    "save_dataset",
    "synthetic_items",
    "write_synthetic_dataset",
]

# Training recipes (no torch; the trainer, losses and evaluation modules import torch and are
# imported by their full names: train.trainer, train.evaluate, train.losses, train.batches).
from .recipe import Recipe, RecipeError, find_recipe, load_recipe, parse_recipe

__all__ += ["Recipe", "RecipeError", "find_recipe", "load_recipe", "parse_recipe"]
