"""Train some stages of a recipe within a wall-clock budget on a lent GPU, and say how many steps fit.

A lent GPU comes for minutes, so a stage's step count is chosen on the machine: each stage first
trains ``--calibrate`` steps in a scratch folder (its real batches, its real workers, next to whatever
else runs on the machine), then trains ``seconds / seconds-per-step`` steps, rounded down to a
hundred, in the run folder. The chosen counts are printed and written to ``RUN/steps.json``; put
them into the recipe so that it says what was trained.

    python scripts/device_train.py RECIPE RUN --stage sam5=420 [--stage vl3=300 ...]
    python scripts/device_train.py RECIPE RUN --stage dense2=#600     (a fixed step count)

Stages run one after another; the stages they start from must be finished in RUN.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from napari_medplib.train.recipe import load_recipe
from napari_medplib.train.trainer import Interrupted, Trainer


def seconds_per_step(recipe, run: Path, name: str, steps: int) -> float:
    """Median seconds of a training step of ``name``, measured on ``steps`` steps in a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "stages").mkdir()
        for done in (run / "stages").glob("*/final/DONE"):
            (scratch / "stages" / done.parent.parent.name).symlink_to(done.parent.parent.resolve())
        trainer = Trainer(recipe, scratch, progress=False)
        try:
            trainer.run(only=[name], stop_after_steps=steps)
        except Interrupted:
            pass
        seconds = [json.loads(line)["seconds"] for line in (scratch / "log.jsonl").read_text().splitlines()]
        shutil.rmtree(scratch / "stages" / name, ignore_errors=True)
    return statistics.median(seconds[len(seconds) // 3:])  # past start-up and compilation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("run")
    parser.add_argument("--stage", action="append", required=True, help="NAME=SECONDS")
    parser.add_argument("--calibrate", type=int, default=60, help="steps timed before choosing (default 60)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    (run / "stages").mkdir(parents=True, exist_ok=True)
    chosen_path = run / "steps.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}
    for spec in args.stage:
        name, seconds = spec.split("=")
        if seconds.startswith("#"):
            steps = int(seconds[1:])
            chosen[name] = {"steps": steps}
        else:
            recipe = load_recipe(args.recipe)
            recipe.stage(name).steps = 10**6  # the calibration's learning rate stays near the peak, like the run's
            t0 = time.perf_counter()
            per_step = seconds_per_step(recipe, run, name, args.calibrate)
            left = float(seconds) - (time.perf_counter() - t0)
            steps = max(100, int(left / per_step) // 100 * 100)
            print(f"{name}: {per_step * 1000:.1f} ms/step -> {steps} steps in {left:.0f} s", flush=True)
            chosen[name] = {"steps": steps, "ms_per_step": round(per_step * 1000, 2)}
        chosen_path.write_text(json.dumps(chosen, indent=2))
        recipe = load_recipe(args.recipe)
        recipe.stage(name).steps = steps
        t0 = time.perf_counter()
        Trainer(recipe, run, progress=False).run(only=[name])
        chosen[name]["seconds"] = round(time.perf_counter() - t0, 1)
        chosen_path.write_text(json.dumps(chosen, indent=2))
        print(f"{name}: trained {steps} steps in {chosen[name]['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
