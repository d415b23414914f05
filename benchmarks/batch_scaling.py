"""How `medplib batch` scales: 1 vs 2 single-threaded Dask workers, against a plain loop over `Session`.

One run measures, on the same folder of real-sized real microscopy crops (grounding + measuring):

* a plain loop in this process: ``Session.load()`` once, then ``ask(..., instances=True)`` and
  ``measure`` per image (torch on 1 thread);
* ``batch(...)`` on a LocalCluster with 1 worker and with 2 workers (1 thread each).

Figures: wall time with start-up, steady throughput (images/s between the first and the last item
finished), scaling efficiency = steady throughput(2) / (2 x throughput(1)), and the batch's per-image
cost against the loop's. A second part writes a 20,000 x 20,000 uint16 tiled TIFF and grounds it
tile by tile in a subprocess (a tiny random model that always answers with a mask, so every tile
writes labels) and reports the peak memory against the plane's size.

    python benchmarks/batch_scaling.py --cache /path/to/real_cache [--n 200] [--side 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
QUESTION = "Please segment the nuclei."


def build_folder(folder: Path, cache: str, n: int, side: int, mirrors: str | None) -> list[str]:
    """``n`` crops of ``side`` px from the real-image catalog (all splits), flipped/rotated for variety."""
    import tifffile
    from real_data import catalog

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for entry in catalog.select("all"):
        try:
            image, _ = catalog.load(entry, cache, mirrors)
        except Exception as exc:  # noqa: BLE001 - a missing source only narrows the pool
            print(f"  skip {entry.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if min(image.shape[:2]) >= side // 2:
            sources.append((entry.name, image))
    if not sources:
        raise SystemExit("no real images found; pass --cache with the real-image cache (see benchmarks/real_images.py)")
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name, image = sources[i % len(sources)]
        h, w = image.shape[:2]
        y0 = int(rng.integers(0, max(1, h - side + 1)))
        x0 = int(rng.integers(0, max(1, w - side + 1)))
        crop = image[y0:y0 + side, x0:x0 + side]
        crop = np.rot90(crop, k=int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        path = folder / f"{i:04d}_{name}.tif"
        tifffile.imwrite(path, np.ascontiguousarray(crop))
        names.append(str(path))
    return names


def plain_loop(paths: list[str]) -> dict[str, float]:
    import torch

    from napari_medplib.engine import Session
    from napari_medplib.engine.measure import measure
    from napari_medplib.image_files import read_plane

    torch.set_num_threads(1)
    start = time.perf_counter()
    session = Session.load(None, device="cpu")
    loaded = time.perf_counter()
    times = []
    objects = 0
    for path in paths:
        image, _ = read_plane(path)
        reply = session.ask(image, QUESTION, instances=True)
        for labels in reply.instances:
            objects += len(measure(labels.astype(np.int64), image if image.ndim == 2 else None)["label"])
        times.append(time.perf_counter())
    session.close()
    return _figures(start, loaded, times, objects)


def _figures(start: float, loaded: float | None, times: list[float], objects: int) -> dict[str, float]:
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    out = {"wall_s": times[-1] - start, "steady_images_per_s": steady, "steady_s_per_image": 1 / steady,
           "objects": objects, "images": len(times)}
    if loaded is not None:
        out["load_s"] = loaded - start
    return out


def batch_run(paths: list[str], out: Path, workers: int) -> dict[str, float]:
    from napari_medplib.batch import Actions, BatchOptions, batch

    times: list[float] = []

    def progress(p) -> None:
        times.append(time.perf_counter())

    start = time.perf_counter()
    result = batch(paths, out, BatchOptions(Actions(ground=(QUESTION,)), device="cpu"), workers=workers,
                   on_progress=progress)
    if result.failed:
        raise SystemExit(f"{result.failed} items failed: {result.failures[:2]}")
    rows = sum(1 for _ in open(out / "objects.csv")) - 1
    return _figures(start, None, times, rows)


def big_plane_memory(work: Path, side: int, model: str) -> dict[str, float]:
    """Ground a side x side uint16 tiled TIFF tile by tile in a fresh process; its peak RSS.

    ``model`` "threshold" stands in for the model with Otsu + connected components per tile (what
    grows with the plane is the reading, stitching and tables, not the model, whose memory is that
    of one tile); "bundled" uses the bundled model (about 2 s per 1024-px tile on 2 CPU cores).
    """
    code = f"""
import json, resource, time
from types import SimpleNamespace
import numpy as np, tifffile
from napari_medplib.batch import Actions, BatchOptions, batch
from napari_medplib.engine.measure import measure
path = {str(work / 'big.tif')!r}

class Threshold:
    model_name, fingerprint = "threshold", "otsu"
    def ask(self, image, question, instances=True, **_):
        from skimage.filters import threshold_otsu
        from skimage.measure import label
        labels = label(image > threshold_otsu(image)).astype(np.int32)
        return SimpleNamespace(text="[SEG]", masks=[labels > 0], instances=[labels], tables=[measure(labels)],
                               measured_count=int(labels.max()))
    def close(self):
        pass

if {model!r} == "bundled":
    import torch
    from napari_medplib.engine import Session
    torch.set_num_threads(1)
    session = Session.load(None, device="cpu")
else:
    session = Threshold()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
result = batch([path], {str(work / 'big_out')!r}, BatchOptions(Actions(ground=("Please segment the nuclei.",))),
               session=session)
print(json.dumps({{"before_mib": before / 1024, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t, "done": result.done, "failures": result.failures}}))
"""
    write = f"""
import numpy as np, tifffile
side, tile = {side}, 512
yy, xx = np.mgrid[:tile, :tile]
disc = ((yy % 64 - 32) ** 2 + (xx % 64 - 32) ** 2 < 15 ** 2).astype(np.uint16) * 30000 + 1000
n = -(-side // tile)
tifffile.imwrite({str(work / 'big.tif')!r}, (disc for _ in range(n * n)), shape=(side, side), dtype=np.uint16,
                 tile=(tile, tile), compression="zlib")
"""
    subprocess.run([sys.executable, "-c", write], check=True)  # its own process: its memory is not counted
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures.update(plane_mib=side * side * 2 / 2**20, side=side, model=model,
                   growth_mib=figures["peak_mib"] - figures["before_mib"])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="real-image cache folder (benchmarks/real_images.py --cache)")
    parser.add_argument("--mirrors", default=None, help="folder of git mirrors for GitHub sources")
    parser.add_argument("--n", type=int, default=200, help="images in the folder (default 200)")
    parser.add_argument("--side", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--big-side", type=int, default=20_000, help="side of the large plane (0: skip)")
    parser.add_argument("--big-model", default="threshold", choices=("threshold", "bundled"),
                        help="who grounds the large plane's tiles (see big_plane_memory)")
    parser.add_argument("--skip-scaling", action="store_true", help="only the large-plane memory part")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    figures: dict[str, object] = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "n": args.n, "side": args.side}
    with tempfile.TemporaryDirectory(prefix="batch-scaling-") as tmp:
        work = Path(tmp)
        if not args.skip_scaling:
            paths = build_folder(work / "images", args.cache, args.n, args.side, args.mirrors)
            print(f"{len(paths)} images of {args.side} px", flush=True)
            figures["loop"] = plain_loop(paths)
            print("loop", figures["loop"], flush=True)
            for workers in (1, 2):
                figures[f"batch_{workers}"] = batch_run(paths, work / f"out{workers}", workers)
                print(f"batch {workers} worker(s)", figures[f"batch_{workers}"], flush=True)
            one, two, loop = figures["batch_1"], figures["batch_2"], figures["loop"]
            figures["speedup_2_vs_1"] = two["steady_images_per_s"] / one["steady_images_per_s"]
            figures["efficiency"] = figures["speedup_2_vs_1"] / 2
            figures["batch_cost_vs_loop"] = one["steady_s_per_image"] / loop["steady_s_per_image"]
            figures["wall_speedup_2_vs_1"] = one["wall_s"] / two["wall_s"]
            print(f"speed-up 2 vs 1 worker: {figures['speedup_2_vs_1']:.2f}x (efficiency {figures['efficiency']:.2f});"
                  f" batch per-image cost / plain loop: {figures['batch_cost_vs_loop']:.3f}")
        if args.big_side:
            figures["big_plane"] = big_plane_memory(work, args.big_side, args.big_model)
            print("big plane", figures["big_plane"], flush=True)
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, dict)}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
