"""Training seconds per step with the batches made in the trainer vs. ahead in worker processes.

For each named stage of a recipe, in one run on this machine: the stage alone (from scratch weights:
step time does not depend on their values) for ``--steps`` steps with ``data_workers = 0`` and with
each of ``--workers``; prints the median seconds per step after ``--skip`` warm-up steps and the ratio
to no workers. The batches are the same either way (``tests/train/test_trainer.py``).

    python benchmarks/train_data_workers.py                              # tiny-cpu: sam, regions, vl2, moe
    python benchmarks/train_data_workers.py --stages regions --workers 1 2 --steps 60 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def seconds_per_step(recipe, stage_name: str, workers: int, steps: int, skip: int) -> tuple[float, float]:
    """(median seconds per step from the trainer's log, wall seconds including worker start-up)."""
    from napari_medplib.train.trainer import Interrupted, Trainer

    stage = dataclasses.replace(recipe.stage(stage_name), init="scratch", copy={}, experts=[], steps=steps + skip)
    alone = dataclasses.replace(recipe, stages=[stage], data_workers=workers, final="", path=None)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        try:
            Trainer(alone, run_dir, progress=False, log=lambda _: None).run(stop_after_steps=steps + skip)
        except Interrupted:
            pass
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records[skip:]), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-cpu")
    parser.add_argument("--stages", nargs="+", default=["sam", "regions", "vl2", "moe"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the recipe's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from napari_medplib.train.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.threads:
        recipe = dataclasses.replace(recipe, threads=args.threads)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    print(f"recipe {recipe.name}, torch threads {torch.get_num_threads()}, {args.steps} steps per measurement",
          file=sys.stderr)
    rows = []
    for name in args.stages:
        base, base_wall = seconds_per_step(recipe, name, 0, args.steps, args.skip)
        row = {"stage": name, "workers": {0: {"s_per_step": base, "wall_s": round(base_wall, 1)}}}
        print(f"{name:10s} workers 0: {base:.3f} s/step", flush=True)
        for workers in args.workers:
            sec, wall = seconds_per_step(recipe, name, workers, args.steps, args.skip)
            row["workers"][workers] = {"s_per_step": sec, "wall_s": round(wall, 1), "speedup": round(base / sec, 2)}
            print(f"{name:10s} workers {workers}: {sec:.3f} s/step  x{base / sec:.2f} vs none", flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"recipe": recipe.name, "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
