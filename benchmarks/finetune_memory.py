"""Peak memory of fine-tuning on a 1024 x 1024 plane, CPU (the floor: <= 3 GB).

A synthetic 16-bit 1024^2 plane with ~150 annotated nuclei-like objects is fine-tuned with the default
options (box + click steps and grounding steps, LoRA) for ``--steps`` steps, held-out measuring included.
Prints the process's peak resident memory before training (model loaded, plane in memory) and at the
end, and their ratio. Memory does not grow with the step count (each step works on crops and tiles), so
a short run measures it.

    OMP_NUM_THREADS=2 python benchmarks/finetune_memory.py --steps 30
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plane(side: int = 1024, n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    image = rng.normal(800, 60, (side, side))
    for i in range(1, n + 1):
        cy, cx = rng.integers(20, side - 20, 2)
        r = rng.uniform(6, 14)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)
        labels[disc] = i
        image[disc] += rng.uniform(1500, 3000)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args(argv)
    from napari_medplib.engine import Session
    from napari_medplib.train.finetune import FinetuneOptions, finetune
    from napari_medplib.train.finetune_data import annotated_planes

    image, labels = plane(args.side)
    base = Session.load(None)
    planes = annotated_planes([image], [labels], "nuclei")
    before = peak_gb()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        finetune(planes, Path(tmp) / "m", base_model=base, options=FinetuneOptions(steps=args.steps))
        seconds = time.perf_counter() - start
    after = peak_gb()
    print(f"plane {args.side}x{args.side}, {int(labels.max())} objects, {args.steps} steps, {seconds:.0f} s")
    print(f"peak RSS: {before:.2f} GB before training, {after:.2f} GB after ({after / before:.2f}x); floor 3 GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
