"""``medplib finetune``: end to end with a tiny model; bad input -> exit 2 and nothing written; Ctrl-C resumes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("torch")

from napari_medplib.cli import main  # noqa: E402
from napari_medplib.io import labels_to_geojson, write_geojson  # noqa: E402
from napari_medplib.testing import make_tiny_model_folder  # noqa: E402
from napari_medplib.train import finetune_inputs  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("model") / "m")


def blobs(size: int = 72, n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey plane with ``n`` bright discs on a dim ground, and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(25, 3, (size, size))
    labels = np.zeros((size, size), np.uint16)
    for i in range(n):
        cy, cx = 12 + 16 * (i // 4), 10 + 17 * (i % 4)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        labels[disc] = i + 1
        image[disc] += 90
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    image, labels = blobs()
    paths = {"image": tmp_path / "cells.tif", "labels": tmp_path / "cells_labels.tif",
             "regions": tmp_path / "cells.geojson"}
    tifffile.imwrite(paths["image"], image)
    tifffile.imwrite(paths["labels"], labels)
    write_geojson(paths["regions"], labels_to_geojson(labels, {"features": {"index": list(range(1, 9)),
                                                                           "class": ["nucleus"] * 8}}))
    return paths


def run(model: Path, images: list[Path], labels: list[Path], out: Path, *extra: str) -> int:
    argv = ["finetune", *map(str, images), "--labels", *map(str, labels), "--from", str(model), "--out", str(out),
            "--steps", "2", "--device", "cpu", *extra]
    return main(argv)


def test_finetune_end_to_end(model, data, tmp_path, capsys):
    out = tmp_path / "adapted"
    code = run(model, [data["image"], data["image"]], [data["labels"], data["regions"]], out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("config.json", "model.safetensors", "README.md", "finetune.json"):
        assert (out / name).is_file(), name
    assert "box Dice" in captured.out and "click Dice" in captured.out and f"model: {out}" in captured.out
    assert "loading the model ..." in captured.err and "step 2/2: loss" in captured.err
    recipe = json.loads((out / "finetune.json").read_text())
    assert recipe["classes"] == ["nucleus", "object"]
    assert [im["name"] for im in recipe["images"]] == ["cells.tif (image 1)", "cells.tif (image 2)"]
    assert recipe["options"]["steps"] == 2


def test_class_option_names_every_object(model, data, tmp_path, capsys):
    out = tmp_path / "adapted"
    assert run(model, [data["image"]], [data["regions"]], out, "--class", "Cell", "--no-eval", "--no-grounding") == 0
    capsys.readouterr()
    recipe = json.loads((out / "finetune.json").read_text())
    assert recipe["classes"] == ["cell"] and recipe["options"]["grounding"] is False


@pytest.mark.parametrize("case, message", [
    ("missing labels", "nope.tif: no such labels file"),
    ("count", "1 image file(s) but 2 labels file(s)"),
    ("missing model", "no such model folder"),
    ("few objects", "fine-tuning needs at least 4"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(model, data, tmp_path, capsys, case, message):
    out = tmp_path / "adapted"
    images, labels, base = [data["image"]], [data["labels"]], model
    if case == "missing labels":
        labels = [tmp_path / "nope.tif"]
    elif case == "count":
        labels = [data["labels"], data["labels"]]
    elif case == "missing model":
        base = tmp_path / "no_model"
    else:
        _, few = blobs(n=2)
        tifffile.imwrite(tmp_path / "few.tif", few)
        labels = [tmp_path / "few.tif"]
    code = run(base, images, labels, out)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("medplib: error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not out.exists()


def test_an_existing_output_folder_is_refused_untouched(model, data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run(model, [data["image"]], [data["labels"]], out) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_ctrl_c_saves_and_the_same_command_resumes(model, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "adapted"
    args = (model, [data["image"]], [data["labels"]], out, "--steps", "3", "--no-eval")
    log = finetune_inputs.ProgressPrinter.log
    handler = signal.getsignal(signal.SIGINT)

    def log_then_interrupt(self, record):
        log(self, record)
        if record["step"] == 1:
            signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C after the first step

    with monkeypatch.context() as patch:
        patch.setattr(finetune_inputs.ProgressPrinter, "log", log_then_interrupt)
        assert run(*args) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command again to resume" in err
    assert (out / "finetune" / "state.pt").is_file() and not (out / "DONE").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C behaves as usual again

    assert run(*args) == 0
    err = capsys.readouterr().err
    assert "resuming after step 1" in err
    steps = [json.loads(line)["step"] for line in (out / "finetune" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "model.safetensors").is_file() and (out / "DONE").exists()
