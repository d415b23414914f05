"""Labels writing (ids, slices, undo), provenance export, settings file, chat rendering."""

import json

import numpy as np
import pytest
from napari.layers import Labels

from napari_medplib.regions import Region
from napari_medplib.ui.chat import ChatEntry, render_entry
from napari_medplib.ui.output import (
    OutputLayerError,
    export_provenance,
    next_free_id,
    provenance_entry,
    record_provenance,
    write_planes,
)
from napari_medplib.ui.settings import WidgetSettings, load_settings, save_settings
from napari_medplib.ui.workers import describe_error, segment_prompts


def _square(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_write_planes_next_ids_current_slice_and_one_undo():
    layer = Labels(np.zeros((3, 10, 10), np.int32))
    layer.data[0, 0, 0] = 4
    a, b = _square((10, 10), 0, 3, 0, 3), _square((10, 10), 5, 8, 5, 8)
    ids, written = write_planes(layer, [((2,), [a, b])])
    assert ids == [5, 6] and written == 18
    assert (layer.data[2][a] == 5).all() and (layer.data[2][b] == 6).all()
    assert not layer.data[1].any() and layer.data[0, 0, 0] == 4
    layer.undo()
    assert not layer.data[2].any()
    layer.redo()
    assert layer.data[2].sum() == 9 * 5 + 9 * 6


def test_write_planes_keeps_existing_and_empty_masks_get_no_id():
    data = np.zeros((6, 6), np.int32)
    data[0:2, 0:2] = 9
    layer = Labels(data)
    full, empty = np.ones((6, 6), bool), np.zeros((6, 6), bool)
    ids, written = write_planes(layer, [((), [empty, full])])
    assert ids == [10] and written == 32 and (layer.data[0:2, 0:2] == 9).all()
    ids, written = write_planes(layer, [((), [full])], replace=True)
    assert ids == [11] and (layer.data == 11).all()
    assert next_free_id(layer) == 12


def test_stack_planes_share_ids_and_bad_output_layer_is_named():
    layer = Labels(np.zeros((4, 5, 5), np.int32))
    m = np.ones((5, 5), bool)
    ids, _ = write_planes(layer, [((i,), [m]) for i in range(4)])
    assert ids == [1] and (layer.data == 1).all()
    small = Labels(np.zeros((3, 3), np.int32), name="tiny")
    with pytest.raises(OutputLayerError, match=r"'tiny'.*New layer"):
        write_planes(small, [((), [m])])


def test_provenance_record_and_export(tmp_path):
    layer = Labels(np.zeros((4, 4), np.int32))
    entry = provenance_entry(
        question="Q?",
        answer="A [SEG].",
        model="tiny",
        image="img",
        regions=["box 0 of 'boxes'"],
        label_ids=[1],
        plane=(2,),
    )
    record_provenance(layer, entry)
    record_provenance(layer, dict(entry, question="Q2?"))
    assert [e["question"] for e in layer.metadata["medplib"]] == ["Q?", "Q2?"]
    paths = export_provenance(layer.metadata["medplib"], tmp_path / "labels.json")
    assert [p.name for p in paths] == ["labels.json", "labels.md"]
    assert json.loads(paths[0].read_text())[1]["question"] == "Q2?"
    md = paths[1].read_text()
    assert "## 1. Q?" in md and "box 0 of 'boxes'" in md and "labels 1" in md


def test_settings_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "s.json"
    assert load_settings(path) == WidgetSettings()  # missing file -> defaults
    s = WidgetSettings(source="folder", folder="/m", device="cpu", max_new_tokens=64)
    assert save_settings(s, path) == path
    assert load_settings(path) == s and load_settings(path).model_source == "/m"
    path.write_text('{"device": "warp-drive", "max_new_tokens": 32, "extra": 1, "llm_weights": "int4"}')
    got = load_settings(path)
    assert got.device == "auto" and got.max_new_tokens == 32 and got.llm_weights == "full"
    s.llm_weights = "int8"
    save_settings(s, path)
    assert load_settings(path).llm_weights == "int8"
    path.write_text("not json")
    assert load_settings(path) == WidgetSettings()


def test_chat_rendering_escapes_and_shows_swatches():
    html = render_entry(ChatEntry("user", "is <b> bold?", [("box 0", "#ff0000")]))
    assert "&lt;b&gt;" in html and "#ff0000" in html
    html = render_entry(ChatEntry("assistant", "yes", footer="tiny · experts 60/40%", done=False))
    assert "experts 60/40%" in html and "&#9646;" in html


def test_segment_prompts_and_error_lines():
    pos, neg = (
        Region.point(5, 5, image_shape=(20, 20)),
        Region.point(9, 9, positive=False, image_shape=(20, 20)),
    )
    box = Region.box(2, 2, 10, 12, image_shape=(20, 20))
    assert segment_prompts([pos, neg]) == [
        {"points": [(5.0, 5.0), (9.0, 9.0)], "point_labels": [1, 0]}
    ]
    (prompt,) = segment_prompts([box, pos])
    assert prompt["box"] == (2.0, 2.0, 10.0, 12.0) and prompt["point_labels"] == [1]
    assert segment_prompts([]) == []
    assert describe_error(ValueError("bad image; convert it")) == "MedPLIB: bad image; convert it"
    assert "cpu" in describe_error(MemoryError())
    assert "RuntimeError: CUDA out of memory" not in describe_error(
        RuntimeError("CUDA out of memory")
    )


def test_chat_stream_finish_and_abort(qtbot):
    from napari_medplib.ui.chat import ChatPane

    chat = ChatPane()
    qtbot.addWidget(chat)
    sent = []
    chat.asked.connect(sent.append)
    chat.input.setText("  hello <region>  ")
    chat.send()
    assert sent == ["hello <region>"] and chat.input.text() == ""
    chat.add_question("hello <region>", [("box 0", "#00ff00")])
    for piece in ("Sure", ", ", "done"):
        chat.append_text(piece)
    chat.finish_answer(footer="tiny · 0.1 s")
    assert chat.entries[-1].text == "Sure, done" and chat.entries[-1].done
    chat.abort_answer("error")  # nothing open: the finished answer keeps its footer
    assert chat.entries[-1].footer == "tiny · 0.1 s"
    chat.start_answer()
    chat.abort_answer("error")
    assert chat.entries[-1].footer == "error" and chat.entries[-1].done
    chat.set_busy(True)
    chat.input.setText("ignored while busy")
    chat.send()
    assert sent == ["hello <region>"] and chat.stop_button.isEnabled()
    chat.clear()
    assert chat.entries == [] and chat.plain_text() == ""


def test_model_load_errors_name_the_widget_fix():
    from napari_medplib.engine import ModelNotFoundError

    line = describe_error(
        ModelNotFoundError("no model given and the bundled model is not installed")
    )
    assert line.startswith("MedPLIB: no model given") and "Model settings" in line


def test_mask_pixels_match_nonzero_and_write_the_same():
    from napari_medplib.ui.output import mask_pixels

    rng = np.random.default_rng(1)
    mask = np.zeros((40, 50), bool)
    mask[5:30, 12:44] = rng.random((25, 32)) > 0.5
    pix = mask_pixels(mask)
    rows, cols = np.nonzero(mask)
    np.testing.assert_array_equal(pix.rows, rows)
    np.testing.assert_array_equal(pix.cols, cols)
    assert mask_pixels(np.zeros((4, 4), bool)).size == 0
    a, b = Labels(np.zeros((40, 50), np.int32)), Labels(np.zeros((40, 50), np.int32))
    write_planes(a, [((), [mask])])
    write_planes(b, [((), [pix])])
    np.testing.assert_array_equal(a.data, b.data)


def test_a_failed_provenance_export_leaves_the_earlier_log_whole(tmp_path, monkeypatch):
    import napari_medplib.ui.output as output

    export_provenance([{"question": "first"}], tmp_path / "log")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*_a, **_k):
        raise OSError("No space left on device")

    monkeypatch.setattr(output, "provenance_markdown", fail)
    with pytest.raises(OSError, match="space"):
        export_provenance([{"question": "second"}], tmp_path / "log")
    assert (tmp_path / "log.md").read_bytes() == before["log.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.json", "log.md"]  # no temporary left
