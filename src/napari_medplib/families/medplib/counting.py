"""MedPLIB's objects and counts: ``<SEG>`` masks split into one label per object, and how-many answers
measured by grounding the counted noun (see ``engine.instance_grounding`` and ``engine.counting``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...engine.image import ModelView
from ...regions import Region


def split_instances(family, seg_hidden, masks, view: ModelView, image, question: str, regions: Sequence[Region],
                    mask_mode: str, contrast_limits, rgb, on_progress, timings: dict[str, float]):
    """(masks, `instance_grounding.SplitResult`) of the answer's ``<SEG>`` masks: one label per object;
    large planes are grounded again in tiles at the model's scale (their merged masks replace ``masks``).
    Tiles only without regions (a region's box prompts SAM on the whole plane) and in corrected mode."""
    from ...engine.counting import segment_noun
    from ...engine.instance_grounding import split_grounding

    mark = time.perf_counter()
    prompts = family.model.seg_prompt_embeddings(seg_hidden)
    split = split_grounding(family, view, image, prompts, masks, noun=segment_noun(question),
                            contrast_limits=contrast_limits, rgb=rgb,
                            tile=not regions and mask_mode == "corrected", on_progress=on_progress)
    timings["instances"] = time.perf_counter() - mark
    return split.masks, split


def measured_count(family, view: ModelView, image, question: str, regions: Sequence[Region], template: str,
                   contrast_limits, rgb, on_progress, timings: dict[str, float]):
    """For a how-many question: (noun, instance labels or None, count or None) from grounding the noun with
    the model's grounding question and splitting its mask; None when the question counts nothing.
    With regions, objects whose centroid lies in any of them are counted."""
    import torch

    from ...engine.counting import grounding_question, how_many_noun
    from ...engine.measure import count_instances
    from ...model.generation import GenerationConfig
    from ...model.tokenizer import encode_question, get_template

    noun = how_many_noun(question)
    if noun is None:
        return None
    mark = time.perf_counter()
    model = family.model
    ids, _ = encode_question(model.tokenizer, grounding_question(noun), 0, template, ())
    features = family.clip_features(view, on_progress)
    prefix, _ = family.prefix(view, template, ids, features)
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, stop_strings=get_template(template).stop_strings,
                              eos_token_id=model.config.eos_token_id)
    result = model.generate(torch.tensor(ids), image_features=features, config=config, prefix=prefix)
    labels = count = None
    if result.seg_indices(model.tokenizer.seg_token_id):
        seg_hidden = model.answer_seg_hidden(result)[:1]
        masks, _ = family.ground(seg_hidden, view, "corrected", on_progress)
        _, split = split_instances(family, seg_hidden, masks, view, image, grounding_question(noun), (),
                                   "corrected", contrast_limits, rgb, on_progress, {})
        labels = split.labels[0]
        within = None
        if regions:
            within = np.zeros(view.image_hw, bool)
            for region in regions:
                within |= region.to_mask(view.image_hw)
        count = count_instances(labels, within)
    timings["count"] = time.perf_counter() - mark
    return noun, labels, count


def instance_fields(split, counted, image, warnings: list[str], text: str) -> dict[str, Any]:
    """The Reply fields of instance splitting and counting (tables measured on the caller's plane); a
    measured count becomes the answer's number (``counted_text``; the model's words stay in ``model_text``)."""
    from ...engine.counting import counted_answer
    from ...engine.measure import measure

    fields: dict[str, Any] = {}
    if split is not None:
        plane = np.asarray(image)
        intensity = plane if plane.ndim == 2 or plane.shape[-1] <= 4 else None
        fields["instances"] = [labels.astype(np.int32, copy=False) for labels in split.labels]
        fields["tables"] = [measure(labels, intensity) for labels in split.labels]
    if counted is not None:
        noun, labels, count = counted
        fields.update(count_noun=noun, measured_count=count, count_labels=labels)
        if count is not None:
            fields["counted_text"] = counted_answer(text, noun, count)
        if count is None:
            warnings.append(f"the model grounded no mask for '{noun}', so nothing was counted")
    return fields
