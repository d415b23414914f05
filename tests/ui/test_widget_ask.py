"""The dock widget end to end with a fake session: ask, stream, write labels, transcript."""

import numpy as np
import pytest
from qtpy.QtCore import Qt
from ui_fakes import FakeSession

from napari_medplib.ui.chat import DESCRIBE
from napari_medplib.ui.widget import MedplibWidget

pytestmark = pytest.mark.viewer


def _dock(viewer, session):
    widget = MedplibWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget, name="MedPLIB")
    return widget


def _wait_idle(qtbot, widget, timeout=10_000):
    qtbot.waitUntil(lambda: widget._worker is None and widget._loader is None, timeout=timeout)


def test_ground_writes_labels_with_image_scale(
    make_napari_viewer_proxy, qtbot, blobs, fake_session, tmp_path
):
    viewer = make_napari_viewer_proxy()  # what plugins get: layers behind PublicOnlyProxy
    viewer.add_image(blobs, name="cells", scale=(0.5, 0.25), translate=(3, 4))
    viewer.add_shapes(
        [[[8, 8], [22, 24]]],
        shape_type="rectangle",
        name="boxes",
        scale=(0.5, 0.25),
        translate=(3, 4),
        edge_color="red",
    )
    widget = _dock(viewer, fake_session)
    assert [ly.name for ly in widget.pickers.region_layers] == ["boxes"]
    qtbot.keyClicks(widget.chat.input, "Please segment the cell in <region>.")
    qtbot.keyPress(widget.chat.input, Qt.Key.Key_Return)  # Enter sends
    assert widget.chat.input.text() == ""
    _wait_idle(qtbot, widget)
    out = [ly for ly in viewer.layers if type(ly).__name__ == "Labels"]
    assert len(out) == 1
    labels = out[0]
    assert labels.name.startswith("cells")
    assert widget.pickers.output_layer is labels  # later answers go to the same layer
    assert labels.data.shape == blobs.shape
    np.testing.assert_allclose(labels.scale, (0.5, 0.25))
    np.testing.assert_allclose(labels.translate, (3, 4))
    # the fake grounds the bright square inside the box
    assert set(np.unique(labels.data)) == {0, 1}
    assert labels.data[15, 15] == 1 and labels.data[45, 60] == 0
    # transcript: question with a red swatch, streamed answer, note about the label
    user, answer = widget.chat.entries[-2:]
    assert user.role == "user" and user.swatches and user.swatches[0][1] == "#ff0000"
    assert answer.role == "assistant" and "[SEG]" in answer.text and answer.done
    assert "label 1" in answer.footer and labels.name in answer.footer
    assert "experts 75/25%" in answer.footer
    assert fake_session.calls[-1][1:] == (blobs.shape, "Please segment the cell in <region>.", 1)
    # provenance
    log = labels.metadata["medplib"]
    assert log[-1]["question"].startswith("Please segment") and log[-1]["label_ids"] == [1]
    assert "box" in log[-1]["regions"][0]
    paths = widget.export_log(str(tmp_path / "answers"))
    assert [p.name for p in paths] == ["answers.json", "answers.md"]
    assert "Please segment the cell" in paths[1].read_text()


def test_second_answer_gets_next_id_and_never_overwrites(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    existing = np.zeros(blobs.shape, dtype=np.int32)
    existing[10:15, 10:22] = 7  # the top half of the first square is already labelled
    viewer.add_labels(existing, name="mine")
    widget = _dock(viewer, FakeSession())
    widget.pickers.set_output(viewer.layers["mine"])
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    data = viewer.layers["mine"].data
    assert (data[10:15, 10:22] == 7).all()  # kept
    assert (data[15:20, 10:22] == 8).all()  # new id = max + 1 on free pixels only
    assert (data[40:50, 50:70] == 8).all()
    viewer.layers["mine"].undo()  # one undo step removes the whole answer
    np.testing.assert_array_equal(viewer.layers["mine"].data, existing)


def test_replace_overwrites(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    existing = np.zeros(blobs.shape, dtype=np.int32)
    existing[10:15, 10:22] = 7
    viewer.add_labels(existing, name="mine")
    widget = _dock(viewer, FakeSession())
    widget.pickers.set_output(viewer.layers["mine"])
    widget.pickers.replace.setChecked(True)
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    assert (viewer.layers["mine"].data[10:20, 10:22] == 8).all()


def test_describe_without_regions_adds_no_layer(
    make_napari_viewer, qtbot, blobs, fake_session, tmp_path
):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, fake_session)
    qtbot.mouseClick(widget.chat.describe_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, widget)
    assert [type(ly).__name__ for ly in viewer.layers] == ["Image"]
    assert widget.chat.entries[-1].text.startswith("A 64 x 80 image")
    assert "A 64 x 80 image" in widget.chat.plain_text()
    # text-only answers are logged by the widget and exportable too
    assert widget.history[-1]["question"] == DESCRIBE
    paths = widget.export_log(str(tmp_path / "log"))
    assert DESCRIBE in paths[1].read_text()


def test_rgb_image_gives_2d_labels(make_napari_viewer, qtbot, blobs, fake_session):
    viewer = make_napari_viewer()
    rgb = np.stack([(blobs // 12).astype(np.uint8)] * 3, axis=-1)
    viewer.add_image(rgb, name="he", rgb=True, scale=(2, 2))
    widget = _dock(viewer, fake_session)
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    labels = viewer.layers["he MedPLIB"]
    assert labels.data.shape == blobs.shape
    np.testing.assert_allclose(labels.scale, (2, 2))
    assert fake_session.calls[-1][1] == rgb.shape and labels.data[15, 15] == 1


def test_huge_multiscale_answers_at_a_coarser_level(make_napari_viewer, qtbot, blobs, monkeypatch):
    from napari_medplib.ui import layers

    monkeypatch.setattr(layers, "MAX_PLANE_PIXELS", 2000)
    viewer = make_napari_viewer()
    viewer.add_image([blobs, blobs[::2, ::2]], multiscale=True, name="slide", scale=(0.5, 0.5))
    session = FakeSession()
    widget = _dock(viewer, session)
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    labels = viewer.layers["slide MedPLIB"]
    assert session.calls[-1][1] == (32, 40) and labels.data.shape == (32, 40)
    np.testing.assert_allclose(labels.scale, (1.0, 1.0))  # level-1 pixels are twice as large
    assert labels.data[7, 7] == 1 and labels.data[22, 30] == 1 and labels.data[0, 0] == 0
