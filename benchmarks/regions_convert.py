"""Region conversion speed: ours (per-shape bounding-box scanline fill) vs full-canvas polygon2mask.

napari's `Shapes.to_masks` and most plugins rasterise every shape on the whole image with
skimage's polygon2mask. Prints both times and their ratio, measured in one run on this machine.

    python benchmarks/regions_convert.py [--shapes 1000] [--size 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from skimage.draw import polygon2mask

from napari_medplib.regions import regions_from_shapes


def make_shapes(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return [
        c + r * np.c_[np.sin(t), np.cos(t)]
        for c, r in zip(rng.uniform(0, size, (n, 2)), rng.uniform(5, 40, n), strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--baseline-shapes", type=int, default=100, help="shapes timed for the slow baseline")
    args = parser.parse_args()
    shapes = make_shapes(args.shapes, args.size)
    shape = (args.size, args.size)

    t0 = time.perf_counter()
    result = regions_from_shapes(shapes, "polygon", image_shape=shape)
    labels = result.to_labels()
    ours = time.perf_counter() - t0

    n_base = min(args.baseline_shapes, args.shapes)
    t0 = time.perf_counter()
    base_labels = np.zeros(shape, np.int32)
    for i, verts in enumerate(shapes[:n_base], start=1):
        base_labels[polygon2mask(shape, verts)] = i
    baseline = (time.perf_counter() - t0) * args.shapes / n_base  # extrapolated per shape, linear in n

    agree = np.mean([np.array_equal(result[i].to_mask(shape), polygon2mask(shape, shapes[result[i].index]))
                     for i in range(min(20, len(result)))])
    print(f"{args.shapes} polygons on {args.size}x{args.size}: {len(result)} regions, labels max {labels.max()}")
    print(f"ours (regions + to_labels): {ours:.3f} s")
    print(f"full-canvas polygon2mask:   {baseline:.3f} s (timed on {n_base} shapes, scaled to {args.shapes})")
    print(f"speed-up: {baseline / ours:.1f}x; identical masks on first 20 shapes: {agree:.0%}")


if __name__ == "__main__":
    main()
