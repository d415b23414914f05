"""Object counts of a model on real microscopy images with reference instance masks.

The bundled model counts with its object counter (``model/counter.py``), trained on synthetic images
only. This asks it "How many nuclei/bacteria are there?" about 256-px windows of the real frames of
``benchmarks/real_data/catalog.py`` whose objects are nuclei or bacteria (the counter's nouns; same
fetching and cache as ``benchmarks/real_images.py``; contrast limits: the frame's (0.5, 99.5)
percentiles), and compares the answer, and the counter's own count, with the reference:
the instances with at least 12 pixels in the window (the synthetic data's ``MIN_AREA``; an instance cut
by the window's edge counts, as one cut by a synthetic image's edge does). Windows on a grid with
half-window stride; windows with more than ``--max-count`` (default 40, what the counter reads)
or no reference instance are left out.

    python benchmarks/real_counts.py                        # bundled model, CPU, every split
    python benchmarks/real_counts.py --split tune --model FOLDER --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_images import DEFAULT_CACHE, load_catalog

#: Catalog objects that the bundled model's counter counts (its count nouns).
COUNTED = ("nuclei", "bacteria")
#: Smallest piece of an instance that counts in a window (synthetic ``MIN_AREA``).
MIN_PIXELS = 12


def window_starts(length: int, window: int) -> list[int]:
    """Start offsets of windows along one axis, half-window stride, the last one flush with the end."""
    if window <= 0 or window >= length:
        return [0]
    stride = max(1, window // 2)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def counted_entries(catalog, split: str = "all", only=None) -> list:
    """Catalog entries whose objects the counter counts, of ``split`` ("tune", "report" or "all")."""
    return [e for e in catalog.CATALOG if e.objects in COUNTED and (split == "all" or e.split == split)
            and (only is None or e.name in only)]


def window_count(labels: np.ndarray, min_pixels: int = MIN_PIXELS) -> int:
    """Instances with at least ``min_pixels`` pixels in a window of a label image."""
    areas = np.bincount(labels.ravel())
    return int(np.count_nonzero(areas[1:] >= min_pixels))


def parse_count(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def count_windows(session, image: np.ndarray, labels: np.ndarray, noun: str, *, window: int = 256,
                  max_count: int = 25) -> list[dict]:
    """Per window: the reference count, the model's answer and its counter's count for ``noun``."""
    from napari_medplib.imaging import DEFAULT_PERCENTILES

    limits = None if image.dtype == np.uint8 else [float(v) for v in np.percentile(image, DEFAULT_PERCENTILES)]
    model = session.model
    channel = model.config.count_nouns.index(noun) if noun in (model.config.count_nouns or []) else None
    rows = []
    for r0 in window_starts(labels.shape[0], window):
        for c0 in window_starts(labels.shape[1], window):
            crop_labels = labels[r0 : r0 + window, c0 : c0 + window]
            truth = window_count(crop_labels)
            if truth == 0 or truth > max_count:
                continue
            crop = image[r0 : r0 + window, c0 : c0 + window]
            reply = session.ask(crop, f"How many {noun} are there?", contrast_limits=limits, max_new_tokens=4)
            counted = None
            if channel is not None:  # the counter's peaks, kept with the image's cached features
                key = session.embed(crop, contrast_limits=limits)
                features = session._features.get(("clip", key))  # a benchmark may look inside
                counted = int(features.count_peaks[0, channel].sum())
            rows.append({"window": [r0, c0], "truth": truth, "answer": reply.text.strip(),
                         "answered": parse_count(reply.text), "counter": counted})
    return rows


def summary(rows: list[dict]) -> dict:
    def scores(key: str) -> tuple[float, float]:
        pairs = [(r[key], r["truth"]) for r in rows if r[key] is not None]
        if not pairs:
            return float("nan"), float("nan")
        return (float(np.mean([a == t for a, t in pairs])), float(np.mean([abs(a - t) for a, t in pairs])))

    answer_exact, answer_mae = scores("answered")
    counter_exact, counter_mae = scores("counter")
    return {"windows": len(rows), "mean_truth": float(np.mean([r["truth"] for r in rows])) if rows else float("nan"),
            "answer_exact": answer_exact, "answer_mae": answer_mae,
            "counter_exact": counter_exact, "counter_mae": counter_mae}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="all")
    parser.add_argument("--only", nargs="*", default=None, help="catalog names to run")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-count", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from napari_medplib.engine import Session

    catalog = load_catalog()
    entries = counted_entries(catalog, args.split, args.only)
    if not entries:
        parser.error(f"no catalog image of {' or '.join(COUNTED)} matches --split/--only")
    session = Session.load(args.model, device="cpu") if args.model else Session.load(device="cpu")
    results = {}
    print(f"{'image':16s} {'noun':9s} {'windows':>7s} {'truth':>6s} {'answer exact':>12s} {'MAE':>5s} "
          f"{'counter exact':>13s} {'MAE':>5s}")
    for entry in entries:
        image, labels = catalog.load(entry, args.cache.expanduser())
        rows = count_windows(session, image, labels, entry.objects, window=args.window, max_count=args.max_count)
        s = summary(rows)
        results[entry.name] = {"split": entry.split, "summary": s, "windows": rows}
        print(f"{entry.name:16s} {entry.objects:9s} {s['windows']:7d} {s['mean_truth']:6.1f} "
              f"{s['answer_exact']:12.2f} {s['answer_mae']:5.2f} {s['counter_exact']:13.2f} {s['counter_mae']:5.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
