"""The widget writes a grounded answer's objects one id each, with their table in layer.features, and shows
the measured count of how-many questions beside the model's answer."""

import numpy as np
import pytest
from ui_fakes import FakeSession

from napari_medplib.engine.measure import measure
from napari_medplib.ui.instances_output import append_features, object_pixels
from napari_medplib.ui.widget import MedplibWidget

pytestmark = pytest.mark.viewer


class ObjectsSession(FakeSession):
    """The fake session's answer, plus its mask split into connected objects (as the engine's replies carry)."""

    def ask_stream(self, image, question, regions=(), **kwargs):
        from scipy import ndimage as ndi

        stream = super().ask_stream(image, question, regions, **kwargs)
        inner = stream._pieces

        def gen():
            reply = yield from inner
            reply.instances = [ndi.label(m)[0].astype(np.int32) for m in reply.masks]
            reply.tables = [measure(labels, image) for labels in reply.instances]
            reply.measured_count = 2 if "how many" in question.lower() else None
            reply.count_noun = "cells" if reply.measured_count is not None else None
            return reply

        stream._pieces = gen()
        return stream


def _wait_idle(qtbot, widget, timeout=10_000):
    qtbot.waitUntil(lambda: widget._worker is None and widget._loader is None, timeout=timeout)


def test_objects_get_fresh_ids_and_features(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    existing = np.zeros(blobs.shape, dtype=np.int32)
    existing[0:3, 0:3] = 4
    viewer.add_labels(existing, name="mine")
    widget = MedplibWidget(viewer, session=ObjectsSession())
    viewer.window.add_dock_widget(widget, name="MedPLIB")
    widget.pickers.set_output(viewer.layers["mine"])
    widget.chat.ask("Please segment the cells.")
    _wait_idle(qtbot, widget)
    layer = viewer.layers["mine"]
    data = layer.data
    assert (data[0:3, 0:3] == 4).all()  # existing labels kept
    assert data[15, 15] == 5 and data[45, 60] == 6  # one fresh id per object, after the existing ones
    features = layer.features
    assert features["index"].tolist() == [5, 6] and features["label"].tolist() == [5, 6]
    assert features["area"].tolist() == [120, 200]
    assert features["mean_intensity"].tolist() == pytest.approx([3000.0, 2500.0])
    assert "wrote 2 objects (labels 5-6)" in widget.chat.entries[-1].footer
    widget.chat.ask("Please segment the cells.")  # the same objects again: already labelled, no empty ids
    _wait_idle(qtbot, widget)
    assert layer.features["index"].tolist() == [5, 6] and data.max() == 6
    assert "nothing was written" in widget.chat.entries[-1].footer
    assert "(0 px)" not in widget.chat.plain_text()
    widget.pickers.replace.setChecked(True)
    widget.chat.ask("Please segment the cells.")  # with replace, a second answer appends rows
    _wait_idle(qtbot, widget)
    assert layer.features["index"].tolist() == [5, 6, 7, 8]


def test_how_many_shows_the_measured_count(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = MedplibWidget(viewer, session=ObjectsSession())
    viewer.window.add_dock_widget(widget, name="MedPLIB")
    widget.chat.ask("How many cells are there?")
    _wait_idle(qtbot, widget)
    answer, note = widget.chat.entries[-2:]
    assert answer.role == "assistant" and note.role == "note"
    assert note.text == "Measured: 2 cells (grounded instances)"


def test_object_pixels_and_feature_rows_without_a_viewer():
    labels = np.zeros((5, 6), np.int32)
    labels[0, :2] = 2
    labels[3:, 4:] = 1
    pixels = object_pixels(labels)
    assert [p.size for p in pixels] == [4, 2] and pixels[1].cols.tolist() == [0, 1]

    class Layer:
        features = None

    import pandas as pd

    layer = Layer()
    append_features(layer, pd.DataFrame({"index": [3, 4], "area": [1, 2]}))
    append_features(layer, pd.DataFrame({"index": [4, 5], "area": [9, 8]}))
    assert layer.features["index"].tolist() == [3, 4, 5] and layer.features["area"].tolist() == [1, 9, 8]
