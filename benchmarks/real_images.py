"""Real microscopy with reference instance masks: the model's masks, instances and counts beside model-free baselines.

Every figure stands next to what a microscopist gets without a model, measured in the same run on the
same objects (``napari_medplib.scoring``):

* box prompt (the object's tight box) -> Dice, vs the ellipse inscribed in the box;
* one click (the object's deepest interior pixel) -> Dice, vs the Otsu component under the click;
* "Please segment the <noun>." -> instance F1 and mean matched IoU at IoU 0.5 (StarDist / cellpose
  convention) and count error, vs Otsu + distance-transform watershed;
* "How many <noun> are in this image?" -> the answer's count error (the LLM's own number).

Prompts go through ``Session.segment`` / ``Session.ask`` on the whole plane exactly as the widget and the
CLI send them (the engine chooses its crop, ``window="auto"``; ``--window`` overrides it), with the
engine's default contrast (robust percentiles of the plane).

Images come from ``benchmarks/real_data/catalog.py`` (packages on the registry and public repositories,
pinned by version/commit and SHA-256; ``benchmarks/real_data/SOURCES.md``), split **before any model was
run on them** into ``tune`` images (method choices may look at these) and ``report`` images (measured
only for the figures in ``docs/``). Use ``--split report`` for the published figures.

    OMP_NUM_THREADS=2 python benchmarks/real_images.py --split tune
    python benchmarks/real_images.py --split report --json docs/real-images-report.json
    python benchmarks/real_images.py --split tune --only dsb2018_nuclei --window 256 --no-ground
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("~/.cache/napari-medplib/real-images").expanduser()


def load_catalog():
    """``benchmarks/real_data/catalog.py`` as a module (benchmarks/ is not a package)."""
    name = "medplib_real_catalog"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "real_data" / "catalog.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- prompts
def evaluate_prompts(session, image: np.ndarray, labels: np.ndarray, *, max_instances: int = 30, seed: int = 0,
                     window="auto", contrast_limits=None) -> dict:
    """Box and click Dice per instance, each with its baseline (ellipse, Otsu component)."""
    from napari_medplib.scoring import instance_boxes, otsu_split, prompt_scores, select_instances

    boxes = instance_boxes(labels)
    above, _ = otsu_split(image)
    rows = [prompt_scores(session, image, labels, label, window=window, contrast_limits=contrast_limits,
                          box=boxes[label], above=above)
            for label in select_instances(list(boxes), max_instances, seed)]
    return _summarise(rows, ("box_dice", "ellipse_dice", "point_dice", "otsu_dice")) | {"instances": rows}


def _summarise(rows: list[dict], keys: Sequence[str]) -> dict:
    return {f"{k}": float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in keys} | {"n": len(rows)}


# ------------------------------------------------------------------------------------ instances
def evaluate_grounding(session, image: np.ndarray, labels: np.ndarray, noun: str, contrast_limits=None) -> dict:
    """Instances of "Please segment the <noun>." and the answer to "How many <noun> ...?" vs Otsu + watershed."""
    from scipy import ndimage as ndi

    from napari_medplib.scoring import match_instances, otsu_watershed

    start = time.perf_counter()
    reply = session.ask(image, f"Please segment the {noun}.", contrast_limits=contrast_limits, max_new_tokens=32)
    seconds = time.perf_counter() - start
    instances = getattr(reply, "instances", None)
    if instances:
        predicted = np.asarray(instances[0])
    elif reply.masks:
        predicted = ndi.label(reply.masks[0])[0]
    else:
        predicted = np.zeros(labels.shape, np.int32)
    model = match_instances(labels, predicted)
    baseline = match_instances(labels, otsu_watershed(image))
    asked = session.ask(image, f"How many {noun} are in this image?", contrast_limits=contrast_limits,
                        max_new_tokens=16)
    said = _first_number(asked.text)
    n_ref = model.n_reference
    return {
        "noun": noun, "answer": reply.text, "seconds": seconds,
        "f1": model.f1, "mean_matched_iou": model.mean_matched_iou, "count_error": model.count_error,
        "n_reference": n_ref, "n_predicted": model.n_predicted,
        "ws_f1": baseline.f1, "ws_mean_matched_iou": baseline.mean_matched_iou,
        "ws_count_error": baseline.count_error, "ws_n_predicted": baseline.n_predicted,
        "count_answer": asked.text, "count_said": said,
        "count_said_error": abs(said - n_ref) / n_ref if said is not None and n_ref else float("nan"),
    }


def _first_number(text: str) -> int | None:
    found = re.search(r"\d+", text or "")
    return int(found.group()) if found else None


# ------------------------------------------------------------------------------------- report
def _fmt(value: float) -> str:
    return "  -  " if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    header = (f"{'image':<24} {'modality':<12} {'split':<6} {'n':>3}  {'box':>5} {'ellip':>5}  {'click':>5} {'otsu':>5}"
              f"  {'F1':>5} {'wsF1':>5}  {'mIoU':>5} {'wsIoU':>5}  {'cnt':>5} {'wsCnt':>5} {'said':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        p, g = r["prompts"], r.get("grounding") or {}
        lines.append(
            f"{r['name'][:24]:<24} {r['modality'][:12]:<12} {r['split']:<6} {p['n']:>3}  {_fmt(p['box_dice'])} "
            f"{_fmt(p['ellipse_dice'])}  {_fmt(p['point_dice'])} {_fmt(p['otsu_dice'])}  {_fmt(g.get('f1'))} "
            f"{_fmt(g.get('ws_f1'))}  {_fmt(g.get('mean_matched_iou'))} {_fmt(g.get('ws_mean_matched_iou'))}  "
            f"{_fmt(g.get('count_error'))} {_fmt(g.get('ws_count_error'))} {_fmt(g.get('count_said_error'))}")
    return "\n".join(lines)


def overall(rows: list[dict]) -> dict:
    """Means over images (each image weighs the same) and over instances, with the floors' margins."""
    keys = ("box_dice", "ellipse_dice", "point_dice", "otsu_dice")
    out = {f"{k}_mean_of_images": float(np.mean([r["prompts"][k] for r in rows])) for k in keys}
    every = [i for r in rows for i in r["prompts"]["instances"]]
    out |= {f"{k}_mean_of_instances": float(np.mean([i[k] for i in every])) for k in keys}
    out["box_minus_ellipse_worst_image"] = float(min(r["prompts"]["box_dice"] - r["prompts"]["ellipse_dice"] for r in rows))
    out["point_minus_otsu_worst_image"] = float(min(r["prompts"]["point_dice"] - r["prompts"]["otsu_dice"] for r in rows))
    grounded = [r["grounding"] for r in rows if r.get("grounding")]
    for key in ("f1", "ws_f1", "count_error", "ws_count_error", "mean_matched_iou", "ws_mean_matched_iou"):
        values = [g[key] for g in grounded if not np.isnan(g[key])]
        out[f"{key}_mean_of_images"] = float(np.mean(values)) if values else float("nan")
    out["n_images"], out["n_instances"] = len(rows), len(every)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="tune")
    parser.add_argument("--only", nargs="*", default=None, help="catalog names to run")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"data cache (default {DEFAULT_CACHE})")
    parser.add_argument("--max-instances", type=int, default=30, help="prompted objects per image (0 = all)")
    parser.add_argument("--window", default="auto", help="engine crop: auto (default), none, or a side in px")
    parser.add_argument("--no-ground", action="store_true", help="skip the grounding / count questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)

    import torch

    from napari_medplib.engine.session import Session

    torch.set_num_threads(max(1, args.threads))
    catalog = load_catalog()
    entries = catalog.select(args.split, args.only)
    if not entries:
        parser.error("no catalog image matches --split/--only")
    data = {}
    for entry in entries:  # data first: a failed download should not wait for a model load
        try:
            data[entry.name] = catalog.load(entry, args.cache.expanduser())
        except Exception as err:  # noqa: BLE001 - one line per source, then stop
            print(f"error: {entry.name}: {err}", file=sys.stderr)
            return 2
    window = args.window if args.window in ("auto", "none") else int(args.window)
    window = None if window == "none" else window
    session = Session.load(args.model, device=args.device)
    print(f"model: {session.model_name}; window {args.window}; {len(entries)} images ({args.split})", file=sys.stderr)
    rows = []
    for entry in entries:
        image, labels = data[entry.name]
        mark = time.perf_counter()
        row = {"name": entry.name, "modality": entry.modality, "split": entry.split, "noun": entry.objects,
               "reference": entry.reference, "shape": list(labels.shape), "n_objects": int(len(np.unique(labels)) - 1)}
        row["prompts"] = evaluate_prompts(session, image, labels, max_instances=args.max_instances, seed=args.seed,
                                          window=window)
        if not args.no_ground:
            row["grounding"] = evaluate_grounding(session, image, labels, entry.objects)
        row["seconds"] = time.perf_counter() - mark
        rows.append(row)
        session.clear_cache()
        print(f"{entry.name}: {row['seconds']:.0f} s", file=sys.stderr)
    print(table(rows))
    summary = overall(rows)
    print(f"overall ({summary['n_images']} images, {summary['n_instances']} prompted objects), mean of images: "
          f"box {summary['box_dice_mean_of_images']:.3f} vs ellipse {summary['ellipse_dice_mean_of_images']:.3f} "
          f"(worst image {summary['box_minus_ellipse_worst_image']:+.3f}); click {summary['point_dice_mean_of_images']:.3f} "
          f"vs Otsu {summary['otsu_dice_mean_of_images']:.3f} (worst image {summary['point_minus_otsu_worst_image']:+.3f})")
    if not args.no_ground:
        print(f"instances: F1 {summary['f1_mean_of_images']:.3f} vs watershed {summary['ws_f1_mean_of_images']:.3f}; "
              f"count error {summary['count_error_mean_of_images']:.3f} vs {summary['ws_count_error_mean_of_images']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        folder = session.folder
        model_name = folder.parent.name if folder is not None and folder.name == "final" else session.model_name
        args.json.write_text(json.dumps({"model": model_name, "split": args.split, "window": args.window,
                                         "max_instances": args.max_instances, "seed": args.seed,
                                         "overall": summary, "images": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
