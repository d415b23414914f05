"""``scripts/device_train.py``: a stage's step count fitted to a time budget, or given, and recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_micro import MICRO_MODEL

from napari_medplib.testing import load_file_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device_train.py"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _micro_recipe_file(folder: Path) -> Path:
    lines = ['name = "micro"', "[model]", *(f"{k} = {_toml_value(v)}" for k, v in MICRO_MODEL.items()),
             "[data]", "n_per_task = 2", "size = 64", "turns_per_sequence = 3", 'styles = ["nuclei"]',
             "[[stages]]", 'name = "sam"', 'kind = "sam"', "steps = 5", "batch_size = 1", "warmup_steps = 0",
             'train = ["sam.*"]', "instances_per_image = 2",
             "[[stages]]", 'name = "regions"', 'tasks = ["region_vqa"]', "image_tokens = false", "steps = 5",
             "batch_size = 1", "warmup_steps = 0", 'copy = { sam = ["sam.*"] }', 'train = ["region_encoder.*"]']
    path = folder / "micro.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _script():
    return load_file_module(SCRIPT, "device_train")


def test_steps_are_given_or_fitted_to_the_budget_and_recorded(tmp_path):
    script = _script()
    recipe, run = _micro_recipe_file(tmp_path), tmp_path / "run"
    assert script.main([str(recipe), str(run), "--stage", "sam=#3"]) == 0
    chosen = json.loads((run / "steps.json").read_text())
    assert chosen["sam"]["steps"] == 3
    assert json.loads((run / "stages" / "sam" / "final" / "DONE").read_text())["steps"] == 3
    # a budget this small fits fewer than 100 steps: the floor of 100 is trained, after 4 timed steps
    assert script.main([str(recipe), str(run), "--stage", "regions=0.01", "--calibrate", "4"]) == 0
    chosen = json.loads((run / "steps.json").read_text())
    assert chosen["regions"]["steps"] == 100 and chosen["regions"]["ms_per_step"] > 0
    assert chosen["sam"]["steps"] == 3  # earlier choices are kept
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["stage"] == "regions"] == list(range(1, 101))  # no calibration steps
    assert not (run / "stages" / "regions" / "resume.pt").exists()
