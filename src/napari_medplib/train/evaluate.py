"""``medplib eval MODEL``: the issue's metrics on a held-out split, as a table and as JSON.

* grounding mDice — every ``<SEG>`` target of every grounding question: the model answers greedily,
  each ``<SEG>`` it generates is decoded to a mask (as the engine does: T-projector -> SAM-Med2D ->
  ``postprocess_masks`` -> sigmoid > 0.1); a target without a generated ``<SEG>`` scores 0;
* box-prompt and point-prompt mDice — SAM-Med2D alone, per instance: the tight box, and the most
  interior pixel as one foreground click; box masks are kept inside the box as ``Session.segment``
  keeps them (``box_decoder_mdice``: the decoder's masks as they are), point masks keep only the
  pieces under the click as ``Session.segment`` keeps them (``point_decoder_mdice``: as they are);
* region-VQA and image-VQA accuracy — ``normalise_answer`` exact match with the canonical answer;
* expert-routing shares — the share of answer tokens each expert took, per task (MoE models).

``compare`` puts two models side by side (the paper's Table 3: dense FFN vs two-expert MoE).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.prompts import keep_clicked_pieces, keep_inside_box, keep_seg_masks_inside_boxes
from ..model.medplib import MedPLIBModel
from ..model.postprocess import masks_from_logits
from ..model.seg_prompts import pair_with_segs
from ..model.tokenizer import encode_question
from .batches import prepare_image, region_mask, seg_region_prompt
from .data import Conversation, RegionSpec, Sample, normalise_answer
from .losses import dice_score
from .steps import box_object_masks, interior_point, point_object_masks, prompt_masks, tight_box

FLOORS = {"grounding_mdice": 0.80, "box_mdice": 0.90, "point_mdice": 0.80, "region_vqa_acc": 0.85, "vqa_acc": 0.90}


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder, or a training run folder (its ``final.json`` names the model, relative to the run)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "final.json").is_file():
        model = Path(json.loads((path / "final.json").read_text())["model"])
        # an absolute path stays as is; runs before 2026-11-24 wrote it relative to the trainer's cwd
        return path / model if (path / model).is_dir() or not model.is_dir() else model
    raise FileNotFoundError(f"{path} is neither a model folder (config.json) nor a training run (final.json)")


class _Scores:
    def __init__(self) -> None:
        self.lists: dict[str, list[float]] = defaultdict(list)
        self.routing: dict[str, np.ndarray] = {}
        self.examples: list[dict[str, Any]] = []

    def add(self, key: str, value: float) -> None:
        self.lists[key].append(float(value))

    def mean(self, key: str) -> float | None:
        values = self.lists.get(key)
        return float(np.mean(values)) if values else None


@torch.no_grad()
def _answer(model: MedPLIBModel, conv: Conversation, image, features, max_new_tokens: int,
            sam_embedding: torch.Tensor | None = None):
    """The model's answer, its regions read as the engine reads them (``point_region_mask``)."""
    ids, order = encode_question(model.tokenizer, conv.question, len(conv.regions))
    regions = [conv.regions[k] for k in order]
    if sam_embedding is not None and model.point_regions_are_objects:
        clicked = [j for j, r in enumerate(regions) if r.kind == "point"]
        objects = point_object_masks(model, sam_embedding, image, [regions[j].point for j in clicked])
        for j, mask in zip(clicked, objects, strict=True):
            if mask is not None:
                regions[j] = RegionSpec("mask", mask=mask)
    masks = [torch.from_numpy(region_mask(region, image.original_hw)) for region in regions]
    objects = None
    if masks and sam_embedding is not None and model.regions_read_brightness:
        boxed = [j for j, r in enumerate(regions) if r.kind == "box"]
        found = box_object_masks(model, sam_embedding, image, [regions[j].box for j in boxed])
        objects = torch.zeros((len(masks), *masks[0].shape), dtype=torch.uint8)
        for j, mask in zip(boxed, found, strict=True):
            if mask is not None:
                objects[j] = torch.from_numpy(region_mask(RegionSpec("mask", mask=mask), image.original_hw))
    return model.generate(torch.tensor(ids), image_features=features,
                          region_masks=[torch.stack(masks)] if masks else None,
                          region_objects=[objects] if objects is not None else None, max_new_tokens=max_new_tokens)


@torch.no_grad()
def evaluate_model(model: MedPLIBModel, items: Iterable[tuple[Sample, list[Conversation]]], *,
                   max_new_tokens: int = 24, instances_per_image: int = 8, progress: bool = False,
                   keep_examples: int = 20) -> dict[str, Any]:
    """All metrics over ``items`` (sample, conversations) pairs; returns the JSON-ready result."""
    model.eval()
    if model.region_encoder is not None:
        model.region_encoder.on_empty = "zero"
    scores = _Scores()
    n_samples = 0
    start = time.perf_counter()
    for index, (sample, convs) in enumerate(items):
        n_samples += 1
        image = prepare_image(sample)
        features = model.encode_image(image.clip_pixels, image.brightness[None] if model.regions_read_brightness else None)
        embedding = model.sam.encode_image(image.sam_pixels) if model.sam is not None else None
        for conv in convs:
            result = _answer(model, conv, image, features, max_new_tokens, embedding)
            if result.expert_counts is not None:
                counts = result.expert_counts.sum(0).numpy()
                scores.routing[conv.task] = scores.routing.get(conv.task, 0) + counts
            if conv.task == "grounding":
                masks = []
                seg = result.seg_indices(model.tokenizer.seg_token_id)
                if seg and embedding is not None:
                    regions = _question_regions(model, conv)
                    masks = model.ground(model.answer_seg_hidden(result), image_embeddings=embedding,
                                         resize_hw=image.resize_hw, original_hw=image.original_hw, pad=image.pad,
                                         regions=regions).masks
                    if model.config.seg_region_prompts:  # as the engine returns them
                        masks = keep_seg_masks_inside_boxes(masks, pair_with_segs(len(masks), regions))
                for j, target in enumerate(conv.target_masks):
                    dice = dice_score(masks[j], torch.from_numpy(target)) if j < len(masks) else 0.0
                    scores.add("grounding", dice)
                    scores.add(f"grounding/{sample.style}", dice)
                    scores.add(f"grounding/{conv.kind}", dice)  # semantic, instance (about a region), multi
                correct = None
            else:
                correct = normalise_answer(result.text) == normalise_answer(conv.canonical or conv.answer)
                scores.add(conv.task, correct)
                scores.add(f"{conv.task}/{conv.kind}", correct)
            if len(scores.examples) < keep_examples:
                scores.examples.append({"style": sample.style, "task": conv.task, "question": conv.question,
                                        "expected": conv.answer, "answer": result.text, "correct": correct})
        if embedding is not None:
            _prompt_scores(model, sample, image, embedding, instances_per_image, index, scores)
        if progress:
            print(f"\reval: {n_samples} images, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return _summary(scores, n_samples, time.perf_counter() - start)


def _question_regions(model: MedPLIBModel, conv: Conversation) -> list:
    """The conversation's regions in question order, as ``<SEG>`` region prompts."""
    _, order = encode_question(model.tokenizer, conv.question, len(conv.regions))
    return [seg_region_prompt(conv.regions[k]) for k in order]


def _prompt_scores(model, sample: Sample, image, embedding, k: int, index: int, scores: _Scores) -> None:
    ids = np.unique(sample.labels)
    ids = ids[ids > 0]
    if not len(ids):
        return
    chosen = np.random.default_rng([index, 5]).choice(ids, size=min(k, len(ids)), replace=False)
    masks = [sample.labels == i for i in chosen]
    for prompt in ("box", "point"):
        predicted = masks_from_logits(prompt_masks(model, embedding, image, masks, prompt))
        for pred, target in zip(predicted, masks, strict=True):
            target = torch.from_numpy(target)
            raw = dice_score(pred, target)  # what Session.segment returns: the box's mask kept inside it,
            scores.add(f"{prompt}_decoder", raw)  # the click's mask kept to the pieces under the click
            scores.add(f"{prompt}_decoder/{sample.style}", raw)
            if prompt == "box":
                pred = keep_inside_box(pred, tight_box(target.numpy()))
            else:
                pred = keep_clicked_pieces(pred, np.array([interior_point(target.numpy())]), np.ones(1))
            dice = dice_score(pred, target)
            scores.add(prompt, dice)
            scores.add(f"{prompt}/{sample.style}", dice)


def _summary(scores: _Scores, n_samples: int, seconds: float) -> dict[str, Any]:
    metrics = {
        "grounding_mdice": scores.mean("grounding"),
        "box_mdice": scores.mean("box"),
        "box_decoder_mdice": scores.mean("box_decoder"),
        "point_mdice": scores.mean("point"),
        "point_decoder_mdice": scores.mean("point_decoder"),
        "region_vqa_acc": scores.mean("region_vqa"),
        "vqa_acc": scores.mean("vqa"),
    }
    routing = {task: (counts / max(counts.sum(), 1)).round(4).tolist() for task, counts in scores.routing.items()}
    breakdown = {key: round(float(np.mean(v)), 4) for key, v in sorted(scores.lists.items()) if "/" in key}
    counts = {key: len(v) for key, v in scores.lists.items() if "/" not in key}
    return {"metrics": metrics, "floors": FLOORS, "routing_shares": routing, "breakdown": breakdown,
            "counts": counts, "n_images": n_samples, "seconds": round(seconds, 1), "examples": scores.examples}


def model_label(folder: Path, taken: Iterable[str] = ()) -> str:
    """A short column name for a model folder: the stage (``RUN/stages/moe/final`` -> "moe"), or the
    folder's name; prefixed with the run's name when two compared models would share it."""
    parts = folder.parts[:-1] if folder.name == "final" else folder.parts
    name = parts[-1]
    if name in set(taken):
        run = parts[-3] if len(parts) >= 3 and parts[-2] == "stages" else parts[-2] if len(parts) >= 2 else ""
        name = f"{run}/{name}"
        base, k = name, 2
        while name in set(taken):
            name, k = f"{base}#{k}", k + 1
    return name


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one column per model, one row per metric, floors on the right."""
    names = list(results)
    rows = [("metric", *names, "floor")]
    for key, floor in {**FLOORS, "box_decoder_mdice": None, "point_decoder_mdice": None}.items():
        values = [results[n]["metrics"].get(key) for n in names]
        rows.append((key, *(_cell(v, floor) for v in values), "" if floor is None else f"{floor:.2f}"))
    for name in names:
        for task, shares in results[name].get("routing_shares", {}).items():
            rows.append((f"experts/{task}", *(" ".join(f"{s:.2f}" for s in shares) if n == name else ""
                                              for n in names), ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return table + "\n* below the floor" if "*" in table else table


def _cell(value: float | None, floor: float | None) -> str:
    """A metric as printed: 3 decimals, "*" when below its floor (4 decimals if 3 would round up to it)."""
    if value is None:
        return "-"
    if floor is None or value >= floor:
        return f"{value:.3f}"
    return f"{value:.4f}*" if round(value, 3) >= floor else f"{value:.3f}*"


def heldout(n: int, seed: int = 0, n_per_task: int = 4, size: int = 256,
            styles: Sequence[str] | None = None) -> Iterable[tuple[Sample, list[Conversation]]]:
    """The synthetic held-out split (seeds disjoint from every training sample)."""
    from .data import synthetic_items

    options: dict[str, Any] = {"size": (size, size)}
    if styles:
        options["styles"] = tuple(styles)
    return synthetic_items(n, seed=seed, split="heldout", n_per_task=n_per_task, **options)


def evaluate(model_paths: Sequence[str | Path], n: int = 100, seed: int = 0, n_per_task: int = 4,
             data: str | Path | None = None, json_path: str | Path | None = None, progress: bool = True,
             dtype: str = "float32", styles: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate one or more models on the same held-out items; print the table, write the JSON.
    ``styles``: the synthetic styles (default `synth.DEFAULT_STYLES`), e.g. ``["bacteria"]``."""
    from .data import load_dataset
    from .synth import STYLES

    bad = sorted(set(styles or ()) - set(STYLES))
    if bad:
        raise ValueError(f"unknown style(s) {bad}; choose from {list(STYLES)}")
    if styles and data is not None:
        raise ValueError("styles choose synthetic held-out images; a --data folder has its own")

    results = {}
    for path in model_paths:
        folder = resolve_model_folder(path)
        model = MedPLIBModel.from_pretrained(folder, dtype=dtype)
        if data is None:
            items = heldout(n, seed=seed, n_per_task=n_per_task, styles=styles)
        else:
            dataset = load_dataset(data)
            items = (dataset[i] for i in range(min(n, len(dataset))))
        name = model_label(folder, results)
        results[name] = {"model": str(folder), **evaluate_model(model, items, progress=progress)}
    print(format_table(results))
    if json_path is not None:
        from ..atomic import atomic_write_text

        atomic_write_text(json_path, json.dumps(results, indent=2))
    return results
