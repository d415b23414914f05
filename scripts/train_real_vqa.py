"""Teach the bundled model's language side the questions microscopists type, about real images.

Starts from a model folder (default: the bundled model) and trains the language model (its routers
excepted), the projector, the vision tower, the region encoder and the ``<SEG>`` projection on a mix of:

* **real annotated images** of ``benchmarks/real_data/training_set.py`` (H&E, TEM, phase-contrast bacteria,
  Ki67 IHC, DAPI fluorescence, SEM axons; with ``--with-brightfield`` brightfield live cells too; none is
  scored by the benchmarks), random windows, flipped and rotated: modality, stain, description, presence,
  region class and grounding questions;
* **synthetic planes** of every generator style (fluorescence nuclei, cells and mitochondria,
  brightfield, H&E, immunohistochemistry, phase-contrast bacteria, EM neurites and axons), all question
  kinds, so that what the model knows is kept;
* **images unlike microscopy** (``train/unknown.py``: noise of five kinds, windows of training
  photographs), every question answered "I can't tell from this image.".

Questions are drawn from ``train/wording.py``'s paraphrase pools (``wording="paraphrases"``), never from
the real-question benchmark's held-out wordings; answers name modality, stain and objects
(``wording.MODALITY_FACTS``). SAM does not train: box and click masks stay the base model's. The grounding
masks are supervised (BCE + Dice), and ``--keep-prompts`` holds the ``<SEG>`` prompts at those of
``--teacher`` (default: the base model) on the same batch, so grounding stays the teacher's.

    python scripts/train_real_vqa.py --out OUT [--base MODEL] [--teacher MODEL] [--steps 1500] [--cache CACHE]
        [--mirrors DIR]     # the runs that made the bundled model: docs/training.md

Re-running the same command resumes from ``OUT.partial/resume.pt``; each step's data is fixed by
(seed, step). Then score with ``benchmarks/real_vqa.py --model OUT`` and ``benchmarks/real_images.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks" / "real_data"))

#: training-set name prefix -> (modality key of ``wording.MODALITY_FACTS``, category, plural for answers, implied)
REAL_SOURCES = {
    "gbm40_he_": ("he", "nucleus", "nuclei", ("cell", "cytoplasm")),
    "isbi2012_tem_train_": ("tem", "neurite", "neurites", ("mitochondrion",)),
    "omnipose_phase": ("phase", "bacterium", "bacteria", ("cell",)),
    "deepliif_val_ihc_": ("ihc", "nucleus", "nuclei", ("cell", "cytoplasm")),
    "deepliif_val_dapi_": ("fluorescence", "nucleus", "nuclei", ("cell", "cytoplasm")),
    "axondeepseg": ("sem", "axon", "myelinated axons", ("cell",)),
}
#: real brightfield live cells, only with ``--with-brightfield``: both ways tried (colour, grey) made H&E and
#: IHC answers worse on the tune images (docs/training.md), so the bundled model trains without them.
BRIGHTFIELD_SOURCES = {"dlbf_brightfield_": ("brightfield", "cell", "cells", ())}
#: how often each source is drawn (few images of a modality are drawn as often as many of another)
REAL_WEIGHTS = {"gbm40_he_": 1.0, "isbi2012_tem_train_": 1.0, "omnipose_phase": 1.0, "deepliif_val_ihc_": 1.0,
                "deepliif_val_dapi_": 0.7, "axondeepseg": 1.0, "dlbf_brightfield_": 0.6}
#: sources shown as grey images: the brightfield camera's purple cast made the tiny vision tower call H&E and
#: IHC "brightfield" (tune split: H&E modality 1.0 -> 0.0); most brightfield cameras in labs are monochrome.
GREY_SOURCES = {"dlbf_brightfield_"}
SYNTHETIC_OBJECTS = {"nuclei": "nuclei", "cells": "cells", "organelles": "mitochondria", "brightfield": "cells",
                     "he": "nuclei", "bacteria": "bacteria", "em_neurites": "neurites", "em_axons": "myelinated axons",
                     "ihc": "nuclei"}
MIX = {"real": 0.4, "synthetic": 0.45, "unknown": 0.15}
TRAIN = ["language_model.embed_tokens.*", "language_model.layers.*.self_attn.*",
         "language_model.layers.*.mlp.experts.*", "language_model.layers.*.*layernorm*", "language_model.norm.*",
         "language_model.lm_head.*", "mm_projector.*", "vision_tower.*", "region_encoder.*", "text_hidden_fcs.*"]
KINDS = {
    "real": {"vqa": ("modality", "stain", "description", "presence", "presence"), "region_vqa": ("category",),
             "grounding": ("semantic", "instance")},
    "synthetic": {"vqa": ("modality", "stain", "description", "count", "presence"),
                  "region_vqa": ("category", "category", "count", "size", "shape", "position", "intensity")},
    "unknown": {"vqa": ("modality", "stain", "description", "count", "presence"), "region_vqa": ("category",)},
}
N_PER_TASK = {"real": {"grounding": 1, "region_vqa": 1, "vqa": 4},
              "synthetic": {"grounding": 2, "region_vqa": 2, "vqa": 3},
              "unknown": {"region_vqa": 1, "vqa": 4}}


def real_pool(cache: str, mirrors: str | None) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(image, labels) of every training-set image, by source prefix."""
    import training_set

    pool: dict[str, list] = {prefix: [] for prefix in REAL_SOURCES}
    for entry in training_set.TRAINING:
        prefix = next((p for p in REAL_SOURCES if entry.name.startswith(p)), None)
        if prefix is not None:
            image, labels = training_set.load(entry, cache, mirrors)
            if prefix in GREY_SOURCES and image.ndim == 3:
                image = image[..., :3].astype(np.float32).mean(-1).astype(np.uint8)
            pool[prefix].append((image, labels))
    return pool


def real_sample(prefix: str, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """A random window (160-400 px), flipped / rotated, as a `Sample` with modality answers."""
    from napari_medplib.train.data import Sample
    from napari_medplib.train.wording import image_meta

    modality, category, objects, implied = REAL_SOURCES[prefix]
    h, w = labels.shape
    side = int(rng.integers(160, 401))
    ch, cw = min(h, side), min(w, side)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img, lab = image[y : y + ch, x : x + cw], labels[y : y + ch, x : x + cw]
    k = int(rng.integers(4))
    img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img, lab = _augment(img, lab, rng)
    ids, areas = np.unique(lab, return_counts=True)
    keep = ids[(ids > 0) & (areas >= 12)]
    lab = np.where(np.isin(lab, keep), lab, 0).astype(np.int32)
    meta = {**image_meta(modality, objects), "implied": implied, "source": prefix}
    return Sample(np.ascontiguousarray(img), np.ascontiguousarray(lab), {int(i): category for i in keep}, "real", meta)


def _augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scale (0.6-1.6x), gamma (0.7-1.4), per-channel gain of colour images (stain strength, +-10 %) and a
    little noise: a few real images of a modality stand for many scanners, stains and pixel sizes."""
    from scipy import ndimage as ndi

    zoom = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if abs(zoom - 1) > 0.05 and min(labels.shape) * zoom >= 64:
        factors = (zoom, zoom) + (1,) * (image.ndim - 2)
        image = ndi.zoom(image.astype(np.float32), factors, order=1)
        labels = ndi.zoom(labels, zoom, order=0)
    x = image.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / max(hi - lo, 1e-6)
    x = x ** float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    if x.ndim == 3:
        x = np.clip(1 - (1 - x) * rng.uniform(0.9, 1.1, x.shape[-1]), 0, 1)
    x = np.clip(x + rng.normal(0, rng.uniform(0, 0.03), x.shape), 0, 1)
    return (x * 255).astype(np.uint8), labels.astype(np.int32)


def synthetic_sample(rng: np.random.Generator):
    from napari_medplib.train.synth import STYLES, make_sample
    from napari_medplib.train.wording import STYLE_MODALITY, image_meta

    style = list(STYLES)[int(rng.integers(len(STYLES)))]
    sample = make_sample(style, [int(v) for v in rng.integers(2**31, size=2)], size=(256, 256),
                         bit_depth=16 if rng.random() < 0.5 else 8)
    sample.meta.update(image_meta(STYLE_MODALITY[style], SYNTHETIC_OBJECTS[style]))
    return sample


def step_items(step: int, seed: int, batch: int, pool, wording: str = "paraphrases") -> list:
    """The step's items (one packed conversation sequence each); fixed by (seed, step)."""
    from napari_medplib.train.batches import pack_conversations
    from napari_medplib.train.conversations import make_conversations
    from napari_medplib.train.stream import Item
    from napari_medplib.train.synth import STYLES, vocabulary_for
    from napari_medplib.train.unknown import training_unknown

    rng = np.random.default_rng([seed, step])
    vocabulary = tuple(sorted({*vocabulary_for(list(STYLES)), "neurite", "axon"}))
    prefixes = [p for p in REAL_SOURCES if pool.get(p)]
    weights = np.array([REAL_WEIGHTS[p] for p in prefixes])
    items = []
    while len(items) < batch:
        source = rng.choice(list(MIX), p=list(MIX.values()))
        if source == "real":
            prefix = prefixes[int(rng.choice(len(prefixes), p=weights / weights.sum()))]
            image, labels = pool[prefix][int(rng.integers(len(pool[prefix])))]
            sample = real_sample(prefix, image, labels, rng)
        elif source == "synthetic":
            sample = synthetic_sample(rng)
        else:
            sample = training_unknown(rng)
        kinds = KINDS[source]
        tasks = tuple(N_PER_TASK[source])
        convs = make_conversations(sample, rng, n_per_task=N_PER_TASK[source], tasks=tasks, kinds=kinds,
                                   vocabulary=vocabulary, wording=wording)
        chunks = pack_conversations(convs, tasks, 6, rng)
        if chunks:
            items.append(Item(sample, chunks[int(rng.integers(len(chunks)))]))
    return items


class PromptRecorder:
    """Records the ``<SEG>`` prompt embeddings a model makes (``seg_prompt_embeddings``), in call order."""

    def __init__(self, model) -> None:
        import types

        self.calls: list = []
        original = type(model).seg_prompt_embeddings

        def recording(this, seg_hidden):
            out = original(this, seg_hidden)
            self.calls.append(out)
            return out

        model.seg_prompt_embeddings = types.MethodType(recording, model)


def keep_prompts_loss(student: PromptRecorder, teacher_model, teacher: PromptRecorder, batch, weights):
    """Relative squared distance of the student's ``<SEG>`` prompts to the base model's on the same batch.

    Why: grounding masks come from these prompts through SAM's (frozen) decoder; trained on new questions,
    the language model moved them, and real-image grounding fell apart (HeLa nuclei counted 162 for 124,
    H&E 2656 for 256). Holding the prompts where the base model had them keeps its grounding."""
    import torch

    from napari_medplib.train.steps import llm_losses

    if not student.calls:
        return None
    teacher.calls.clear()
    with torch.no_grad():
        llm_losses(teacher_model, batch, weights)
    s, t = torch.cat(student.calls), torch.cat(teacher.calls).detach()
    return ((s - t) ** 2).sum(-1).mean() / (t**2).sum(-1).mean().clamp_min(1e-6)


def learning_rate(step: int, steps: int, lr: float, warmup: int = 30) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default=None, help="model folder to start from (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--keep-prompts", type=float, default=5.0,
                        help="weight of the loss that keeps the <SEG> prompts of --teacher (0: off)")
    parser.add_argument("--teacher", default=None, help="model whose <SEG> prompts are kept (default: --base)")
    parser.add_argument("--cache", default=str(Path("~/.cache/napari-medplib/real-images").expanduser()))
    parser.add_argument("--mirrors", default=None)
    parser.add_argument("--wording", choices=("paraphrases", "noisy"), default="paraphrases",
                        help="noisy: paraphrases as people also type them (openers, typos, lower case; wording.perturb)")
    parser.add_argument("--with-brightfield", action="store_true",
                        help="also train on the real brightfield images (shown grey; see BRIGHTFIELD_SOURCES)")
    args = parser.parse_args(argv)
    if args.with_brightfield:
        REAL_SOURCES.update(BRIGHTFIELD_SOURCES)

    import torch

    from napari_medplib.model.convert import save_pretrained
    from napari_medplib.model.medplib import MedPLIBModel
    from napari_medplib.paths import bundled_model_dir
    from napari_medplib.train.build import set_trainable
    from napari_medplib.train.recipe import LossWeights
    from napari_medplib.train.steps import llm_losses, make_batch

    torch.set_num_threads(args.threads)
    base = Path(args.base) if args.base else bundled_model_dir()
    out = Path(args.out)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    model = MedPLIBModel.from_pretrained(base)
    set_trainable(model, TRAIN)
    teacher_model = teacher = student = None
    if args.keep_prompts > 0:
        teacher_model = MedPLIBModel.from_pretrained(Path(args.teacher) if args.teacher else base).eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        student, teacher = PromptRecorder(model), PromptRecorder(teacher_model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = 0
    resume = work / "resume.pt"
    if resume.is_file():
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = int(saved["step"])
        print(f"resuming at step {start}", flush=True)
    pool = real_pool(args.cache, args.mirrors)
    print(json.dumps({p: len(v) for p, v in pool.items()}), f"{sum(p.numel() for p in params):,} values train",
          flush=True)
    weights = LossWeights(ce=1.0, bce=1.0, dice=2.0)
    model.train()
    log = open(work / "log.jsonl", "a", encoding="utf-8")
    t_start = time.perf_counter()
    for step in range(start, args.steps):
        torch.manual_seed(int(np.random.default_rng([args.seed, step, 7]).integers(2**62)))
        lr = learning_rate(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        items = step_items(step, args.seed, args.batch, pool, args.wording)
        batch = make_batch(model, items)
        if student is not None:
            student.calls.clear()
        losses = llm_losses(model, batch, weights)
        if student is not None:
            kept = keep_prompts_loss(student, teacher_model, teacher, batch, weights)
            if kept is not None:
                losses["keep_prompts"] = args.keep_prompts * kept
        total = sum((getattr(weights, name) if hasattr(weights, name) else 1.0) * value
                    for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        record = {"step": step + 1, "lr": round(lr, 6), "loss": round(float(total.detach()), 4),
                  **{k: round(float(v.detach()), 4) for k, v in losses.items()}}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % 10 == 0:
            rate = (step + 1 - start) / (time.perf_counter() - t_start)
            print(json.dumps(record), f"{rate:.2f} steps/s", flush=True)
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            tmp = resume.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, tmp)
            tmp.replace(resume)
    log.close()
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp, tokenizer_folder=base)
    (tmp / "TRAINING.json").write_text(json.dumps({"base": str(base.name), "script": "scripts/train_real_vqa.py",
                                                    **{k: v for k, v in vars(args).items() if k not in ("cache", "mirrors", "out", "base")}},
                                                   indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
