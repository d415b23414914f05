"""Teach the bundled model's SAM real microscopy: box prompts on real annotated images.

The images are ``benchmarks/real_data/training_set.py`` (H&E, TEM, Ki67 IHC, DAPI fluorescence,
phase-contrast bacteria, EM axons; none of them is scored by the real-image benchmark), balanced so that
no source dominates, plus synthetic planes of the generator's styles (fluorescence nuclei and cells above
all, of which few real training images are at hand) so that what the model knows is kept. Training is
``train.finetune`` with the grounding path off: SAM's prompt encoder and mask decoder learn from crops
cut exactly as the engine cuts them, and the clicks' crops follow the engine's own estimate of the
clicked object's size (``size_range=False``), not a size range of the annotated objects as a user's
adapted model does.

Box prompts only (``--click-share 0``, the default): measured on the benchmark's tune images, training
on boxes alone also made clicks better (0.654 -> 0.675), while a quarter or half of the examples as
clicks made them worse (0.628, 0.619): a single click on real tissue is ambiguous (one nucleus or its
clump), and SAM's one-mask output learnt the ambiguity as leaks into the neighbours.

Grounding shares SAM's mask decoder: trained on boxes alone, it turned empty planes into noise objects
when prompted by ``<SEG>``. A distillation term (``--keep-grounding``, on by default) keeps the base
model's ``<SEG>`` masks on synthetic grounding frames, empty ones included (``finetune(extra_loss=...)``).

    python scripts/train_real_sam.py --base RUN_DIR/stages/ground29/final --out OUT [--cache CACHE] [--mirrors DIR]

The defaults reproduce the bundled model (``--base``: the ``tiny-gpu`` recipe's last stage; without it,
the bundled model itself). Re-running the same command resumes; then score OUT with
``benchmarks/real_images.py --split tune --model OUT``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks" / "real_data"))

# (entry-name prefix, how many of its images, repeats of each): about 700-1000 objects per source
SOURCES = (("gbm40_he_", 8, 1), ("isbi2012_tem_train_", 8, 1), ("omnipose_phase_", 7, 1),
           ("axondeepseg_subject1", 1, 12), ("deepliif_val_ihc_", 2, 3), ("deepliif_val_dapi_", 2, 2))
# synthetic styles kept in training: (style, planes)
SYNTHETIC = (("nuclei", 24), ("cells", 16), ("organelles", 8), ("brightfield", 8), ("bacteria", 8),
             ("em_axons", 4), ("em_neurites", 4))


def spread(items: list, k: int) -> list:
    """``k`` items spread evenly over the sorted list (not the first k: sections and fields vary)."""
    if k >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round()]


def training_planes(cache: str, mirrors: str | None, synthetic_seed: int = 30):
    """(images, labels, names) of the real and synthetic training planes."""
    import training_set

    from napari_medplib.train.synth import make_sample

    images, labels, names = [], [], []
    for prefix, k, repeats in SOURCES:
        entries = sorted((e for e in training_set.TRAINING if e.name.startswith(prefix)), key=lambda e: e.name)
        for entry in spread(entries, k):
            image, label = training_set.load(entry, cache, mirrors)
            for r in range(repeats):
                images.append(image)
                labels.append(label)
                names.append(f"{entry.name}#{r}" if repeats > 1 else entry.name)
    for s, (style, n) in enumerate(SYNTHETIC):
        for i in range(n):
            sample = make_sample(style, (synthetic_seed, s, i), size=(256, 256), bit_depth=16 if i % 2 else 8)
            images.append(sample.image)
            labels.append(sample.labels)
            names.append(f"synthetic_{style}_{i}")
    return images, labels, names


# grounding frames whose "<SEG>" masks the base model's decoder keeps: (style, noun, how many)
KEEP_GROUNDING = (("nuclei", "nuclei", 8), ("cells", "cells", 6), ("organelles", "mitochondria", 4),
                  ("brightfield", "cells", 4), ("he", "nuclei", 4), ("bacteria", "bacteria", 4))
EMPTY_FRAMES = 12  # frames with nothing in them (noise on a background, as a stack's outer planes)


def grounding_frames(seed: int = 31) -> list[tuple[np.ndarray, str]]:
    """(image, noun) of synthetic grounding frames, empty ones included."""
    from napari_medplib.train.synth import make_sample

    frames = []
    for s, (style, noun, n) in enumerate(KEEP_GROUNDING):
        for i in range(n):
            frames.append((make_sample(style, (seed, s, i), size=(256, 256)).image, noun))
    rng = np.random.default_rng([seed, 99])
    for i in range(EMPTY_FRAMES):
        size = (128, 128) if i % 2 else (256, 256)
        level = rng.uniform(100, 3000)
        ramp = np.linspace(0, rng.uniform(0, 0.3) * level, size[1])[None]
        image = level + ramp + rng.normal(0, rng.uniform(0.02, 0.1) * level, size)
        frames.append((np.clip(image, 0, 65535).astype(np.uint16), "nuclei"))
    return frames


def teacher_grounding(base, frames) -> list[dict]:
    """What the base model's SAM decoder makes of each frame's "<SEG>" prompt (its low-res logits), with the
    inputs it decodes from; the image encoder and the language model do not train, so both stay valid."""
    import torch

    from napari_medplib import Session
    from napari_medplib.engine.session import Session as _Session

    session = Session.load(base) if base else Session.load()
    captured: list[dict] = []
    original = _Session._ground

    def capture(self, seg_hidden, view, mask_mode, on_progress, regions=()):
        from napari_medplib.model.seg_prompts import pair_with_segs

        embeddings, resize_hw, pad = self._sam_embedding(view, None)
        prompts = self.model.seg_prompt_embeddings(seg_hidden)
        seg_regions = pair_with_segs(prompts.shape[0], [])
        low_res, _ = self.model.decode_seg(embeddings, prompts, seg_regions, view.frame_hw, resize_hw, pad)
        captured.append({"embeddings": embeddings.detach().clone(), "prompts": prompts.detach().clone(),
                         "frame_hw": tuple(view.frame_hw), "resize_hw": tuple(resize_hw), "pad": tuple(pad),
                         "teacher": low_res.detach().clone()})
        return original(self, seg_hidden, view, mask_mode, on_progress, regions)

    _Session._ground = capture
    try:
        with torch.inference_mode():
            for image, noun in frames:
                session.ask(image, f"Please segment the {noun}.", instances=False)
    finally:
        _Session._ground = original
        session.close()
    return [{k: (v.clone() if hasattr(v, "clone") else v) for k, v in c.items()} for c in captured]


def keep_grounding_loss(items: list[dict], per_step: int = 2, weight: float = 1.0):
    """An ``extra_loss`` for ``finetune``: the decoder's "<SEG>" logits on the items stay what the base
    model's were (BCE against the teacher's probabilities), so grounding keeps working while boxes learn."""
    import torch
    import torch.nn.functional as F

    from napari_medplib.model.seg_prompts import pair_with_segs

    def loss(model, step: int) -> dict:
        rng = np.random.default_rng([17, step])
        total = 0.0
        for k in rng.choice(len(items), size=min(per_step, len(items)), replace=False):
            item = items[int(k)]
            student, _ = model.decode_seg(item["embeddings"], item["prompts"],
                                          pair_with_segs(item["prompts"].shape[0], []), item["frame_hw"],
                                          item["resize_hw"], item["pad"])
            total = total + F.binary_cross_entropy_with_logits(student.float(), torch.sigmoid(item["teacher"].float()))
        return {"keep_grounding": weight * total / max(1, min(per_step, len(items)))}

    return loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default=None, help="model folder to start from (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--click-share", type=float, default=0.0,
                        help="share of examples that are clicks (default none: box prompts only, see below)")
    parser.add_argument("--keep-grounding", type=float, default=1.0,
                        help="weight of the loss that keeps the '<SEG>' masks of the base model (0: off)")
    parser.add_argument("--train-encoder", action="store_true", help="SAM's image encoder trains too")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path("~/.cache/napari-medplib/real-images").expanduser()))
    parser.add_argument("--mirrors", default=None)
    args = parser.parse_args(argv)

    from napari_medplib.train.finetune import finetune
    from napari_medplib.train.finetune_data import FinetuneOptions, annotated_planes

    images, labels, names = training_planes(args.cache, args.mirrors)
    planes = annotated_planes(images, labels, None, names=names)
    print(f"{len(planes)} planes, {sum(len(p.ids) for p in planes)} objects", flush=True)
    options = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.batch, grounding=False,
                              evaluate=False, holdout=0.02, min_heldout=1, threads=args.threads,
                              checkpoint_every=50, size_range=False,
                              click_share=args.click_share)
    if args.train_encoder:
        options = replace(options, train=(*options.train, "sam.image_encoder.*"))

    def log(record: dict) -> None:
        if record.get("step", 0) % 50 == 0:
            print(json.dumps(record), flush=True)

    extra = None
    if args.keep_grounding > 0:
        items = teacher_grounding(args.base, grounding_frames())
        print(f"{len(items)} grounding frames kept", flush=True)
        extra = keep_grounding_loss(items, weight=args.keep_grounding)
    result = finetune(planes, args.out, args.base, options, on_progress=lambda message, done, total: None,
                      on_log=log, extra_loss=extra)
    print(f"model: {result.model_dir} ({result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
