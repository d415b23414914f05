"""The magicgui grounding function: layer data in, labels data out, in a worker in the viewer."""

import numpy as np
import pytest
from ui_fakes import FakeSession

from napari_medplib.regions import RegionError
from napari_medplib.ui import grounding


@pytest.fixture
def session():
    fake = FakeSession()
    grounding.use_session(fake)
    yield fake
    grounding.use_session(None)


def test_ground_data_with_box_and_stack(session, blobs):
    box = np.array([[8.0, 8.0], [22.0, 24.0]])
    labels = grounding.ground(blobs, "Please segment <region>", shapes=[box])
    assert labels.shape == blobs.shape and labels.dtype == np.int32
    assert (labels[10:20, 10:22] == 1).all() and labels[45, 60] == 0
    stack = np.stack([blobs, blobs[::-1]])
    out = grounding.ground_data(stack, "Please segment the bright things", session=session)
    assert out.shape == stack.shape
    # one id per object; the flipped plane's objects lie elsewhere, so they are new objects
    assert out[0, 15, 15] > 0 and out[1, 64 - 1 - 15, 15] > 0 and out[0, 15, 15] != out[1, 64 - 1 - 15, 15]
    assert len(session.calls) == 3
    same = grounding.ground_data(np.stack([blobs, blobs, blobs]), "Please segment the bright things",
                                 session=session)
    assert (same[0] == same[1]).all() and (same[1] == same[2]).all()  # an object keeps its id through the stack
    assert len(np.unique(same[0])) - 1 == len(np.unique(out[0])) - 1 >= 2  # touching nothing: one id each


def test_region_tag_without_regions_is_a_clear_error(session, blobs):
    with pytest.raises(RegionError, match="no shape or point"):
        grounding.ground(blobs, "What is in <region>?")


def test_points_become_regions(session, blobs):
    grounding.ground(blobs, "What is in <region>?", points=np.array([[15.0, 15.0]]))
    assert session.calls[-1][3] == 1


@pytest.mark.viewer
def test_function_widget_adds_labels_layer(make_napari_viewer, qtbot, session, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    viewer.add_shapes([[[8, 8], [22, 24]]], shape_type="rectangle", name="boxes")
    widget = grounding.make_ground_widget()
    viewer.window.add_dock_widget(widget)
    widget.question.value = "Please segment <region>"
    widget.shapes.native.setCurrentIndex(widget.shapes.native.findText("boxes (data)"))
    widget()
    qtbot.waitUntil(
        lambda: any(type(ly).__name__ == "Labels" for ly in viewer.layers), timeout=5000
    )
    labels = viewer.layers["cells grounded"]
    assert labels.data.shape == blobs.shape and labels.data[15, 15] == 1
