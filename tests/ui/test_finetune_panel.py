"""The "Adapt to my images" panel: layers -> annotated planes, training end to end on a real crop with a
tiny model, bad input as notifications, Cancel then Train resuming from the checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from napari.components import LayerList
from napari.layers import Image, Labels

from napari_medplib.train.finetune_data import FinetuneInputError
from napari_medplib.ui.finetune_panel import (
    FinetunePanel,
    PairTable,
    check_output,
    default_output_folder,
    label_classes,
    pair_input,
    planes_from_pairs,
)
from napari_medplib.ui.settings import WidgetSettings, load_settings, save_settings

CROP = Path(__file__).resolve().parents[1] / "data" / "real" / "dsb2018_nuclei"
N_OBJECTS = 8


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    """Default output folders land in a temporary user data dir."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def crop():
    """(image, labels with the first N_OBJECTS objects wholly inside the crop, their ids)."""
    import tifffile

    image_path, labels_path = Path(f"{CROP}_image.tif"), Path(f"{CROP}_labels.tif")
    if not (image_path.is_file() and labels_path.is_file()):
        pytest.skip("the real test crops are missing from tests/data/real")
    image, labels = tifffile.imread(image_path), tifffile.imread(labels_path).astype(np.int32)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = np.setdiff1d(np.unique(labels), np.append(edge, 0))
    ids = inside[:N_OBJECTS]
    labels[~np.isin(labels, ids)] = 0
    return image, labels, ids


# ---- (a) pure logic: layers -> planes ------------------------------------------------------------
def test_class_names_from_features_then_typed_name_then_object():
    import pandas as pd

    features = {"index": [0, 2, 5], "Class": ["background", "Nucleus", ""]}
    assert label_classes(pd.DataFrame(features)) == {0: "background", 2: "Nucleus"}
    assert label_classes(pd.DataFrame({"class": ["", "a", "b"]})) == {1: "a", 2: "b"}  # row i is label i
    assert label_classes(pd.DataFrame({"label": [1, 2]})) == {}

    labels = np.zeros((32, 32), np.int32)
    for i, (y, x) in enumerate([(2, 2), (2, 20), (20, 2), (20, 20), (12, 12)], start=1):
        labels[y : y + 6, x : x + 6] = i
    image = Image(np.random.default_rng(0).random((32, 32)).astype(np.float32) * 100)
    layer = Labels(labels, features={"index": [2, 3], "class": ["Mitosis", "mitosis"]})
    (plane,) = planes_from_pairs([pair_input(image, layer, "  Nucleus ")])
    assert plane.classes == {1: "nucleus", 2: "mitosis", 3: "mitosis", 4: "nucleus", 5: "nucleus"}
    (plane,) = planes_from_pairs([pair_input(image, Labels(labels))])
    assert set(plane.classes.values()) == {"object"} and not plane.fully_annotated


def test_stack_planes_keep_the_image_layers_contrast():
    rng = np.random.default_rng(1)
    image = Image((rng.random((2, 3, 40, 48)) * 4000).astype(np.uint16), name="cells")
    image.contrast_limits = (100.0, 2500.0)
    labels = np.zeros((2, 3, 40, 48), np.int32)
    labels[0, 0, 5:12, 5:12] = 1
    labels[0, 0, 20:30, 20:30] = 2
    labels[1, 2, 5:15, 30:40] = 7
    labels[1, 2, 25:35, 5:15] = 9
    pair = pair_input(image, Labels(labels, name="cells labels"), "cell")
    assert pair.contrast_limits == (100.0, 2500.0) and pair.name == "cells with cells labels"
    planes = planes_from_pairs([pair], fully_annotated=True)
    assert [p.name for p in planes] == ["cells with cells labels plane 0", "cells with cells labels plane 5"]
    assert [p.ids for p in planes] == [[1, 2], [7, 9]]
    assert all(p.contrast_limits == (100.0, 2500.0) and p.fully_annotated for p in planes)
    np.testing.assert_array_equal(planes[1].image, image.data[1, 2])

    rgb = Image(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), rgb=True)
    assert pair_input(rgb, Labels(labels[0, 0])).contrast_limits is None  # the engine's own RGB contrast


def test_layer_and_folder_problems_are_input_errors(tmp_path):
    with pytest.raises(FinetuneInputError, match="pick an Image layer"):
        pair_input(None, Labels(np.zeros((8, 8), np.int32)))
    with pytest.raises(FinetuneInputError, match="no image"):
        planes_from_pairs([])
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "DONE").write_text("")
    with pytest.raises(FinetuneInputError, match="already holds a finished"):
        check_output(str(tmp_path / "done"))
    first = default_output_folder()
    assert first.name.startswith("adapted-") and "data-home" in str(first)
    first.mkdir(parents=True)
    assert default_output_folder() != first


def test_rows_pick_labels_of_the_images_shape(qtbot):
    viewer = SimpleNamespace(layers=LayerList())
    table = PairTable(viewer)
    qtbot.addWidget(table)
    assert table.rows[0].image_layer is None
    with pytest.raises(FinetuneInputError):
        table.pairs()
    small, big = Image(np.zeros((16, 16)), name="small"), Image(np.zeros((32, 32)), name="big")
    big_labels, small_labels = Labels(np.zeros((32, 32), np.int32)), Labels(np.zeros((16, 16), np.int32))
    for layer in (small, big, big_labels, small_labels):
        viewer.layers.append(layer)
    row = table.rows[0]
    assert row.image_layer is small and row.labels_layer is small_labels
    second = table.add_row()
    assert second.image_layer is big and second.labels_layer is big_labels
    second.image.setCurrentIndex(0)  # choosing the other image picks labels of its shape
    assert second.labels_layer is small_labels
    small.name = "renamed"
    assert row.image.itemText(0) == "renamed" and row.image_layer is small
    table.remove_row()
    assert len(table.rows) == 1 and not table.remove_button.isEnabled()


# ---- viewer tests --------------------------------------------------------------------------------
def _viewer_with_crop(make_napari_viewer, crop):
    image, labels, ids = crop
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuclei")
    viewer.add_labels(labels, name="annotated", features={"index": ids, "class": ["nucleus"] * len(ids)})
    return viewer


def _wait(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: not panel.running, timeout=timeout)


def _logged_steps(out: Path) -> list[int]:
    lines = (out / "finetune" / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.viewer
def test_train_on_a_real_crop_switches_the_model(make_napari_viewer, qtbot, notes, tiny_folder, crop, tmp_path):
    from napari_medplib.ui.widget import MedplibWidget

    save_settings(WidgetSettings(source="folder", folder=str(tiny_folder)))
    viewer = _viewer_with_crop(make_napari_viewer, crop)
    main = MedplibWidget(viewer)
    viewer.window.add_dock_widget(main)
    panel = FinetunePanel(viewer)
    viewer.window.add_dock_widget(panel)
    row = panel.pairs.rows[0]
    assert row.image_layer.name == "nuclei" and row.labels_layer.name == "annotated"
    assert panel.base.currentData() == "current" and "(model)" in panel.base.itemText(0)
    out = tmp_path / "adapted"
    panel.steps.setValue(2)
    panel.holdout.setValue(40)  # 40 % of 8 objects: 3 held out
    panel.output.setText(str(out))
    panel.train_button.click()
    assert panel.running and not panel.train_button.isEnabled()
    _wait(qtbot, panel)

    assert {"config.json", "README.md", "DONE", "finetune.json"} <= {p.name for p in out.iterdir()}
    recipe = json.loads((out / "finetune.json").read_text())
    assert len(recipe["split"]["heldout"]) == 3 and recipe["classes"] == ["nucleus"]
    assert _logged_steps(out) == [1, 2]
    assert "held-out objects: 3" in panel.result.text() and "box Dice" in panel.result.text()
    assert panel.loss.text().startswith("loss ")
    settings = load_settings()
    assert settings.source == "folder" and Path(settings.folder) == out
    assert main.settings.model_source == str(out) and main.model_panel.folder.text() == str(out)
    assert "next question" in main.model_panel.status.text()
    assert panel.output.text() != str(out) and panel.train_button.isEnabled()
    assert "(adapted)" in panel.base.itemText(0)
    assert any("now uses" in m for _, m in notes)
    main.with_session(lambda: None)  # the next question loads the adapted model
    qtbot.waitUntil(lambda: main.session is not None, timeout=20_000)
    assert main.session.model_name == "adapted"


@pytest.mark.viewer
@pytest.mark.parametrize(
    "case, message",
    [
        ("no layers", "pick an Image layer"),
        ("other shape", "do not match the image"),
        ("rgb labels", "RGB"),
        ("one object", "1 annotated object"),
        ("40,000 ids", "40,000 different ids"),
    ],
)
def test_bad_input_is_a_notification_and_trains_nothing(make_napari_viewer, qtbot, notes, tmp_path, case, message):
    image = (np.random.default_rng(0).random((64, 64)) * 1000).astype(np.uint16)
    labels = {
        "other shape": lambda: np.ones((50, 64), np.int32),
        "rgb labels": lambda: np.ones((64, 64, 3), np.int32),
        "one object": lambda: np.pad(np.ones((10, 10), np.int32), 27),
        "40,000 ids": lambda: (np.arange(640 * 64) % 40_000 + 1).astype(np.int32).reshape(640, 64),
    }
    if case == "40,000 ids":  # a grey-level image picked as labels
        image = np.zeros((640, 64), np.uint16)
    viewer = make_napari_viewer()
    if case != "no layers":
        viewer.add_image(image, name="img")
        viewer.add_labels(labels[case](), name="lab")
    calls = []
    panel = FinetunePanel(viewer, train=lambda *a, **k: calls.append(a))
    viewer.window.add_dock_widget(panel)
    out = tmp_path / "out"
    panel.output.setText(str(out))
    panel.train_button.click()
    _wait(qtbot, panel)
    errors = [m for severity, m in notes if "error" in severity.lower()]
    assert any(message in m for m in errors), notes
    assert calls == [] and not out.exists() and panel.last_result is None
    assert load_settings() == WidgetSettings()


@pytest.mark.viewer
def test_cancel_then_train_resumes(make_napari_viewer, qtbot, tiny_folder, crop, tmp_path):
    from napari_medplib.train.finetune import finetune

    save_settings(WidgetSettings(source="folder", folder=str(tiny_folder)))
    reached, release = threading.Event(), threading.Event()
    runs: list[int] = []
    groundings: list[bool] = []

    def held_at_step_2(planes, out, base, options, *, on_log, **kwargs):
        """The real core; the first run waits after step 2 until the test has pressed Cancel."""
        first = not runs
        runs.append(options.steps)
        groundings.append(options.grounding)

        def log(record):
            on_log(record)
            if first and record["step"] == 2:
                reached.set()
                release.wait(20)

        return finetune(planes, out, base, options, on_log=log, **kwargs)

    viewer = _viewer_with_crop(make_napari_viewer, crop)
    panel = FinetunePanel(viewer, train=held_at_step_2)
    viewer.window.add_dock_widget(panel)
    out = tmp_path / "resumed"
    panel.steps.setValue(4)
    panel.grounding.setChecked(False)  # box and click prompts only: the option reaches the core
    panel.output.setText(str(out))
    panel.train_button.click()
    qtbot.waitUntil(reached.is_set, timeout=30_000)
    panel.cancel_button.click()
    release.set()
    _wait(qtbot, panel)
    assert panel.status.text().startswith("stopped; press Train to resume")
    assert (out / "finetune" / "state.pt").is_file() and not (out / "DONE").exists()
    assert _logged_steps(out) == [1, 2] and load_settings().folder == str(tiny_folder)

    panel.train_button.click()  # same layers, options and folder: resumes at step 3
    _wait(qtbot, panel)
    assert runs == [4, 4] and groundings == [False, False] and _logged_steps(out) == [1, 2, 3, 4]
    assert (out / "DONE").is_file() and not (out / "finetune" / "state.pt").exists()
    assert Path(load_settings().folder) == out
