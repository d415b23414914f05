"""Region view on large planes: the bundled model's region-category answers with ``region_view`` "auto" and "plane".

Planes: ``--tiles`` x ``--tiles`` synthetic samples of 256 px (``napari_medplib.train.synth``, one style per
plane, 8-bit, held-out seeds) side by side, so objects keep the pixel size the model was trained on while the
plane grows (8 x 8 tiles: 2048 px, which CLIP sees at 336 px, about 6x smaller). Question: "What is in
<region>?" with the mask of one instance (masks say unambiguously which object is meant, as training draws
them for nested objects); the answer is its category. Instances are drawn balanced over the style's
categories. Each question is asked:

* ``tile``: on the instance's own 256-px tile (the scale the model was trained at: a ceiling);
* ``plane``: on the large plane, squeezed whole into CLIP (the behaviour before the region view);
* ``auto``: on the large plane with the region view (the region token from a crop around the instance);
* ``crop``: on that crop alone, as the whole image (image tokens of the crop too: what cropping by hand gives).

Scoring: the first category word (or "background", or "can't tell") in the answer must be the instance's.
Model-free baselines from the same questions: the most frequent answer overall, and per style (the whole
plane's tokens tell the model the style, so only the within-style choice - cytoplasm or nucleus, nucleus or
lumen - is left to the region). Runs in about 1-1.5 minutes on 2 shared CPU cores (``OMP_NUM_THREADS=1``)::

    OMP_NUM_THREADS=1 python benchmarks/region_view.py
    OMP_NUM_THREADS=1 python benchmarks/region_view.py --tiles 16 --planes 1 --per-plane 16   # 4096-px planes
    OMP_NUM_THREADS=1 python benchmarks/region_view.py --scales 1 2   # the crop also as 2 x 2 tiles, averaged
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter, defaultdict

import numpy as np

from napari_medplib import Region
from napari_medplib.engine import Session
from napari_medplib.families.medplib.region_view import plan_crop
from napari_medplib.train.synth import DEFAULT_STYLES, STYLES, make_sample, sample_seed

TILE = 256
QUESTION = "What is in <region>?"
CONDITIONS = {
    "tile": "own 256-px tile (trained scale)",
    "plane": "large plane, region_view='plane'",
    "auto": "large plane, region_view='auto'",
    "crop": "the auto crop asked as the image",
}


def build_plane(style: str, tiles: int, seed: int):
    """(plane, labels, categories): ``tiles`` x ``tiles`` samples of ``style``; labels made unique per plane."""
    plane = np.zeros((tiles * TILE, tiles * TILE), np.uint8)
    if STYLES[style].default_channels == 3:
        plane = np.zeros((tiles * TILE, tiles * TILE, 3), np.uint8)
    labels = np.zeros((tiles * TILE, tiles * TILE), np.int32)
    categories: dict[int, str] = {}
    tiles_of: dict[int, tuple[np.ndarray, np.ndarray, int, int]] = {}
    offset = 0
    for k in range(tiles * tiles):
        r, c = divmod(k, tiles)
        channels = 1 if style == "cells" else None  # one merged channel: every tile the same layout
        sample = make_sample(style, sample_seed(seed, k, "heldout"), (TILE, TILE), bit_depth=8, channels=channels)
        image = sample.image if sample.image.ndim == plane.ndim else sample.image[..., 0]
        plane[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = image
        tile_labels = np.where(sample.labels > 0, sample.labels + offset, 0)
        labels[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = tile_labels
        for i, cat in sample.categories.items():
            categories[int(i) + offset] = cat
            tiles_of[int(i) + offset] = (image, sample.labels == i, r * TILE, c * TILE)
        offset += int(sample.labels.max())
    return plane, labels, categories, tiles_of


def pick(categories: dict[int, str], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` instance ids, balanced over the categories present."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, cat in categories.items():
        by_cat[cat].append(i)
    names = sorted(by_cat)
    return [int(rng.choice(by_cat[names[k % len(names)]])) for k in range(n)]


def predicted(text: str, vocabulary: list[str]) -> str | None:
    text = text.lower()
    hits = [(m.start(), word) for word in vocabulary for m in re.finditer(re.escape(word), text)]
    return min(hits)[1] if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8, help="tiles per side (8: 2048-px planes)")
    parser.add_argument("--per-plane", type=int, default=8, help="questions per plane")
    parser.add_argument("--planes", type=int, default=2, help="planes per style")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--scales", type=int, nargs="+", default=[1], help="region_scales for 'auto' (tiles per side)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    session = Session.load(None, device="cpu")
    clip_size = session.adapter.clip.size
    session.adapter.region_scales = tuple(args.scales)
    vocabulary = sorted({c for s in DEFAULT_STYLES for c in STYLES[s].categories} | {"background", "can't tell"})
    rng = np.random.default_rng(args.seed)
    rows = []  # (style, truth, {condition: prediction})
    seconds: Counter = Counter()
    for style in DEFAULT_STYLES:
        for p in range(args.planes):
            plane, labels, categories, tiles_of = build_plane(style, args.tiles, args.seed * 1000 + p * 10
                                                              + DEFAULT_STYLES.index(style))
            for instance in pick(categories, args.per_plane, rng):
                tile, tile_mask, r0, c0 = tiles_of[instance]
                answers = {}
                ys, xs = np.nonzero(tile_mask)
                y0, x0, y1, x1 = r0 + ys.min(), c0 + xs.min(), r0 + ys.max(), c0 + xs.max()
                cut = tile_mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                crop = plan_crop(plane.shape[:2], (y0, x0, y1, x1), clip_size)
                for condition in CONDITIONS:
                    mark = time.perf_counter()
                    session.adapter.region_view = "plane" if condition == "plane" else "auto"
                    if condition == "tile":
                        image, region = tile, Region.mask(tile_mask)
                    elif condition == "crop":
                        image = plane[crop.y0 : crop.y1, crop.x0 : crop.x1]
                        region = Region.mask(cut, offset=(y0 - crop.y0, x0 - crop.x0))
                    else:
                        image, region = plane, Region.mask(cut, offset=(y0, x0))
                    reply = session.ask(image, QUESTION, [region], max_new_tokens=args.max_new_tokens)
                    seconds[condition] += time.perf_counter() - mark
                    answers[condition] = predicted(reply.text, vocabulary)
                rows.append((style, categories[instance], answers))
    session.close()

    n = len(rows)
    overall = Counter(t for _, t, _ in rows).most_common(1)[0][0]
    per_style = {s: Counter(t for st, t, _ in rows if st == s).most_common(1)[0][0] for s in DEFAULT_STYLES}
    side = args.tiles * TILE
    print(f"{n} region-category questions on {len(DEFAULT_STYLES) * args.planes} planes of {side} x {side} px "
          f"(CLIP input {clip_size} px); region scales {tuple(args.scales)}; seed {args.seed}")
    print(f"{'condition':<34} {'accuracy':>8}   per style")
    for condition, label in CONDITIONS.items():
        right = [a[condition] == t for _, t, a in rows]
        styles = "  ".join(f"{s} {np.mean([a[condition] == t for st, t, a in rows if st == s]):.2f}"
                           for s in DEFAULT_STYLES)
        print(f"{label:<34} {np.mean(right):8.3f}   {styles}   ({seconds[condition] / n:.2f} s/question)")
    print(f"{'majority answer overall':<34} {np.mean([t == overall for _, t, _ in rows]):8.3f}   ({overall!r})")
    print(f"{'majority answer per style':<34} {np.mean([t == per_style[s] for s, t, _ in rows]):8.3f}")
    flips = Counter((a["plane"] == t, a["auto"] == t) for _, t, a in rows)
    print(f"plane -> auto: {flips[(False, True)]} wrong -> right, {flips[(True, False)]} right -> wrong, "
          f"{flips[(True, True)]} right in both, {flips[(False, False)]} wrong in both")
    for condition in CONDITIONS:
        said = Counter(str(a[condition]) for _, _, a in rows).most_common()
        print(f"answers ({condition}): " + ", ".join(f"{word} {count}" for word, count in said))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
