"""Few-shot fine-tuning on real microscopy: k annotated objects in, Dice on the other objects out.

Protocol (per modality of the real-image catalog, ``benchmarks/real_data/catalog.py``): the first image of
the modality in the chosen split gives k annotated objects (a seeded pick: a partial annotation, as a user
makes it); ``napari_medplib.train.finetune`` adapts the bundled model (or ``--model``) to them; box and
click Dice are measured before and after on up to ``--eval`` *other* objects of that modality (the rest of
the first image and the other images), beside the ellipse-in-box and Otsu-component baselines of the
same objects, and, with ``--ground``, instance F1 of "Please segment the <noun>." before and after on the
modality's other images. Wall time is the fine-tuning alone on this machine's CPU.

    OMP_NUM_THREADS=2 python benchmarks/finetune_real.py --split tune --k 10
    python benchmarks/finetune_real.py --split report --k 5 10 20 --json docs/finetune-real-report.json

Images are fetched as in ``benchmarks/real_images.py`` (``--cache``, ``MEDPLIB_GIT_MIRRORS``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_images import DEFAULT_CACHE, load_catalog  # noqa: E402

#: Catalog modalities measured together (others are their own group; SEM axons and TEM neurites differ).
GROUPS = {"widefield_fluorescence": "fluorescence", "confocal_fluorescence": "fluorescence"}


#: Fewest other objects a modality needs for its figures to be reported.
MIN_EVAL = 5


def keep_only(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """The label image with every id not in ``ids`` set to 0 (a partial annotation)."""
    return np.where(np.isin(labels, list(ids)), labels, 0).astype(np.int32)


def measure(session, items: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, float]:
    from napari_medplib.scoring import otsu_split, prompt_scores

    rows, splits = [], {}
    for image, labels, label in items:
        key = id(image)
        if key not in splits:
            splits[key] = otsu_split(image)[0]
        rows.append(prompt_scores(session, image, labels, label, above=splits[key]))
    return {k: float(np.mean([r[k] for r in rows])) for k in ("box_dice", "ellipse_dice", "point_dice", "otsu_dice")}


def grounding_f1(session, images: list[tuple[np.ndarray, np.ndarray, list[int] | None]], noun: str) -> dict[str, float]:
    """Instance F1 of "Please segment the <noun>." per image, mean over images. An image whose objects were
    partly trained on (``trained`` ids) is scored on its other objects only: predictions on trained objects
    are neither true nor false positives (`scoring.heldout_instance_match`, the plane fully annotated)."""
    from napari_medplib.scoring import heldout_instance_match, otsu_watershed

    model, base = [], []
    for image, labels, trained in images:
        reply = session.ask(image, f"Please segment the {noun}.", max_new_tokens=32)
        if getattr(reply, "instances", None):
            predicted = np.asarray(reply.instances[0])
        elif reply.masks:
            from scipy import ndimage as ndi

            predicted = ndi.label(reply.masks[0])[0]
        else:
            predicted = np.zeros(labels.shape, np.int32)
        others = [int(i) for i in np.unique(labels) if i > 0 and int(i) not in set(trained or ())]
        for out, found in ((model, predicted), (base, otsu_watershed(image))):
            out.append(heldout_instance_match(labels, others, found, fully_annotated=True).f1)
    return {"ground_f1": float(np.mean(model)), "ws_f1": float(np.mean(base))}


def run_group(group: str, entries, k: int, args, cat) -> dict:
    from napari_medplib.engine.session import Session
    from napari_medplib.train.finetune import FinetuneOptions, finetune
    from napari_medplib.train.finetune_data import annotated_planes

    loaded = [(e, *cat.load(e, args.cache, os.environ.get("MEDPLIB_GIT_MIRRORS"))) for e in entries]
    first, image0, labels0 = loaded[0]
    ids0 = sorted(int(i) for i in np.unique(labels0) if i > 0)
    rng = np.random.default_rng([args.seed, k])
    train_ids = sorted(int(i) for i in rng.choice(ids0, size=min(k, len(ids0) - 1), replace=False))
    others = [(image0, labels0, i) for i in ids0 if i not in train_ids]
    for _, image, labels in loaded[1:]:
        others += [(image, labels, int(i)) for i in np.unique(labels) if i > 0]
    if len(others) < MIN_EVAL or len(ids0) <= k:
        print(f"{group:18} k={k:2d}: skipped ({len(ids0)} objects on {first.name}: too few to train on {k} "
              f"and measure on {MIN_EVAL})", flush=True)
        return None
    pick = np.random.default_rng([args.seed, 5]).permutation(len(others))[: args.eval]
    heldout = [others[i] for i in sorted(pick)]
    base = Session.load(args.model) if args.model else Session.load(None)
    before = measure(base, heldout)
    # grounding is scored on the modality's other images, else on the first image's untrained objects
    ground_images = [(im, lab, None) for _, im, lab in loaded[1:]] or [(image0, labels0, train_ids)]
    if args.ground:
        before |= grounding_f1(base, ground_images, first.objects)
    planes = annotated_planes([image0], [keep_only(labels0, train_ids)], first.objects, names=[first.name])
    chosen = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch}
    if args.train:
        chosen["train"] = tuple(args.train)
    options = FinetuneOptions(holdout=0.0, min_heldout=0, evaluate=False, seed=args.seed,
                              **{k: v for k, v in chosen.items() if v})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = finetune(planes, Path(tmp) / "model", base_model=base, options=options)
        seconds = time.perf_counter() - start
        tuned = Session.load(str(result.model_dir))
        after = measure(tuned, heldout)
        if args.ground:
            after |= grounding_f1(tuned, ground_images, first.objects)
        tuned.close()
    base.close()
    row = {"group": group, "k": len(train_ids), "options": {"steps": options.steps, "lr": options.lr,
                                                          "batch_size": options.batch_size, "train": list(options.train)}, "images": [e.name for e, *_ in loaded], "n_eval": len(heldout),
           "seconds": round(seconds, 1), "before": before, "after": after,
           "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    print(f"{group:18} k={row['k']:2d} n={len(heldout):3d} {seconds:6.1f}s  box {before['box_dice']:.3f} -> "
          f"{after['box_dice']:.3f} (ellipse {before['ellipse_dice']:.3f})  click {before['point_dice']:.3f} -> "
          f"{after['point_dice']:.3f} (otsu {before['otsu_dice']:.3f})"
          + (f"  ground F1 {before['ground_f1']:.3f} -> {after['ground_f1']:.3f} (ws {before['ws_f1']:.3f})"
             if args.ground else ""), flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("tune", "report", "all"), default="tune")
    parser.add_argument("--k", type=int, nargs="+", default=[10])
    parser.add_argument("--eval", type=int, default=40, help="held-out objects measured per modality")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the fine-tuning default)")
    parser.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the fine-tuning default)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the fine-tuning default)")
    parser.add_argument("--train", nargs="*", default=None, help="parameter patterns that train (default: the default)")
    parser.add_argument("--only", nargs="*", default=None, help="modality groups (e.g. fluorescence em)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--ground", action="store_true", help="also grounding instance F1 (slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cat = load_catalog()
    groups: dict[str, list] = {}
    for entry in cat.CATALOG:
        if args.split in ("all", entry.split):
            groups.setdefault(GROUPS.get(entry.modality, entry.modality), []).append(entry)
    rows = []
    for k in args.k:  # every modality at one k before the next k
        for group, entries in groups.items():
            if args.only and group not in args.only:
                continue
            row = run_group(group, entries, k, args, cat)
            if row is not None:
                rows.append(row)
                if args.json:  # after every row: a long run that stops keeps what it measured
                    Path(args.json).write_text(json.dumps({"split": args.split, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
