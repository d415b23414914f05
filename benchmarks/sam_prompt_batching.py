"""SAM prompt-training step: one mask-decoder call per batch (``steps.sam_losses``) vs one per image.

Timed on an H100, GPU training steps were launch-bound: a SAM stage decoded each image's box prompts and
point prompts in their own decoder calls (16 calls for a batch of 8), each a few hundred small kernels.
``sam_losses`` now gathers every image's prompts of a kind into one call (``steps.decode_prompts``).
This times a forward + backward of the SAM losses both ways on the same batch, in one run: the batched
path as shipped, and the per-image path rebuilt from ``steps.prompt_masks`` (the same draws, so the
same losses; ``tests/train/test_steps.py`` checks that). The model is a recipe's SAM-Med2D at random
initialisation (the step time does not depend on the weights' values).

    python benchmarks/sam_prompt_batching.py                          # tiny-gpu's SAM, batch 8, CPU
    python benchmarks/sam_prompt_batching.py --device cuda --batch 8 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def per_image_losses(model, items, stage, rng):
    """The pre-batching step: each image's prompts of each kind decoded on their own."""
    import numpy as np
    import torch

    from napari_medplib.train.batches import prepare_image
    from napari_medplib.train.losses import mask_losses
    from napari_medplib.train.steps import prompt_masks

    images = [prepare_image(item.sample) for item in items]
    embeddings = model.sam.encode_image(torch.cat([im.sam_pixels for im in images]))
    kinds = ["box", "point"] if stage.prompt == "box+point" else [stage.prompt]
    logits, targets = [], []
    for b, (item, image) in enumerate(zip(items, images, strict=True)):
        ids = np.unique(item.sample.labels)
        ids = ids[ids > 0]
        masks = [item.sample.labels == i for i in rng.choice(ids, size=min(stage.instances_per_image, len(ids)),
                                                              replace=False)]
        for kind in kinds:
            logits.append(prompt_masks(model, embeddings[b : b + 1], image, masks, kind, rng, jitter=0.05))
            targets.append(torch.from_numpy(np.stack(masks)).float().to(logits[-1].device))
    bce, dice = mask_losses(logits, targets)
    return {"bce": bce, "dice": dice}


def time_step(fn, model, items, stage, repeats: int, device: str) -> float:
    import numpy as np
    import torch

    times = []
    for r in range(repeats + 1):  # the first call warms up (allocator, kernels)
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = fn(model, items, stage, np.random.default_rng(r))
        (losses["bce"] + 5 * losses["dice"]).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-gpu", help="recipe whose [model] SAM to build")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="images per step")
    parser.add_argument("--instances", type=int, default=16, help="instances per image (box + point each)")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    from napari_medplib.train.build import build_model
    from napari_medplib.train.data import synthetic_items
    from napari_medplib.train.recipe import StageSpec, load_recipe
    from napari_medplib.train.steps import sam_losses
    from napari_medplib.train.stream import Item

    recipe = load_recipe(args.recipe)
    model = build_model(recipe.model, recipe.resolve(recipe.model.tokenizer), moe=False).to(args.device).train()
    stage = StageSpec("bench", kind="sam", train=["sam.*"], instances_per_image=args.instances)
    rows = []
    print(f"device {args.device}, threads {torch.get_num_threads()}, {args.instances} instances per image, "
          f"box + point prompts, forward + backward")
    print(f"{'batch':>5} {'per image (s)':>14} {'batched (s)':>12} {'speed-up':>9}")
    for batch in args.batch:
        items = [Item(sample, []) for sample, _ in synthetic_items(batch, seed=11, size=(args.size, args.size))]
        old = time_step(per_image_losses, model, items, stage, args.repeats, args.device)
        new = time_step(sam_losses, model, items, stage, args.repeats, args.device)
        rows.append({"batch": batch, "per_image_s": old, "batched_s": new, "speedup": old / new})
        print(f"{batch:>5} {old:>14.4f} {new:>12.4f} {old / new:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "recipe": args.recipe, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
