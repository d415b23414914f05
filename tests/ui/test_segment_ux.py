"""Direct segmentation as micro-sam users expect it, and the chat's answers to bad input.

Qt-free rules first (prompt planning, writing masks, messages), then the widget in a viewer.
"""

import threading

import numpy as np
import pytest
from ui_fakes import FakeReply, FakeSession

from napari_medplib.regions import Region
from napari_medplib.ui.chat import ChatEntry, render_entry
from napari_medplib.ui.layers import ImagePlane
from napari_medplib.ui.output import redraw, redraw_target, stack_output_problem, write_masks
from napari_medplib.ui.widget import MedplibWidget
from napari_medplib.ui.workers import plan_prompts

SHAPE = (40, 60)


# ---- Qt-free -------------------------------------------------------------------------------------
def test_a_click_combines_only_with_a_box_that_holds_it():
    box = Region.box(2, 2, 12, 14, image_shape=SHAPE, source="old", index=0)
    inside = Region.point(6, 6, image_shape=SHAPE, source="points", index=0)
    far = Region.point(30, 50, image_shape=SHAPE, source="points", index=1)
    negative = Region.point(8, 10, positive=False, image_shape=SHAPE, source="points", index=2)
    plan = plan_prompts([box, inside, negative])
    assert len(plan.prompts) == 1 and not plan.notes
    assert plan.prompts[0]["box"] == (2.0, 2.0, 12.0, 14.0)
    assert plan.prompts[0]["point_labels"] == [1, 0]
    plan = plan_prompts([box, far, negative])  # an old box elsewhere: two objects, and a note
    assert len(plan.prompts) == 2
    assert plan.prompts[0]["box"] == (2.0, 2.0, 12.0, 14.0) and plan.prompts[0]["point_labels"] == [0]
    assert "box" not in plan.prompts[1] and plan.prompts[1]["points"][0] == (30.0, 50.0)
    assert len(plan.notes) == 1 and "outside every box" in plan.notes[0] and "'old'" in plan.notes[0]
    assert plan_prompts([negative]).negatives_only and not plan_prompts([negative]).prompts


class Layer:
    """The part of a napari Labels layer that the output helpers use."""

    def __init__(self, data):
        self.data, self.name, self.steps = data, "out", 0

    def data_setitem(self, where, value):
        self.data[where] = value

    def block_history(self):
        import contextlib

        self.steps += 1
        return contextlib.nullcontext()


def test_masks_on_labelled_pixels_get_no_id_and_an_object_is_redrawn_not_ringed():
    layer = Layer(np.zeros(SHAPE, np.int32))
    first = np.zeros(SHAPE, bool)
    first[5:15, 5:15] = True
    assert write_masks(layer, [((), [first])]) == ({0: 1}, 100)
    again = np.zeros(SHAPE, bool)
    again[4:16, 4:16] = True  # the same object, a little larger
    assert redraw_target(layer, (), again) == (1, 100 / 144)
    ids, written = write_masks(layer, [((), [first, again])])  # nothing free under the first: no id
    assert ids == {1: 2} and written == 44  # the ring a re-segmented object would get
    layer.data[layer.data == 2] = 0
    assert redraw(layer, (), again, 1) == 144
    assert (layer.data == 1).sum() == 144 and layer.data.max() == 1
    other = np.zeros(SHAPE, bool)
    other[30:35, 40:50] = True
    assert redraw_target(layer, (), other) is None


def test_a_whole_stack_needs_an_output_with_the_stack_axis():
    plane = ImagePlane("stack", None, (5, *SHAPE), False, (2,), np.eye(4), None)
    assert stack_output_problem(None, plane, 0) == ""
    assert stack_output_problem(Layer(np.zeros((5, *SHAPE))), plane, 0) == ""
    message = stack_output_problem(Layer(np.zeros(SHAPE)), plane, 0)
    assert "merged" in message and "'New layer'" in message


def test_the_mask_token_is_shown_as_a_marker():
    html = render_entry(ChatEntry("assistant", "Sure, <SEG> .", marks=["label 3 in 'cells MedPLIB'"]))
    assert "&lt;SEG&gt;" not in html and "label 3 in" in html
    html = render_entry(ChatEntry("assistant", "Sure, <SEG> .", marks=["empty mask"]))
    assert "empty mask" in html and "SEG" not in html
    assert "SEG" not in render_entry(ChatEntry("assistant", "Sure, <SEG> .", done=False))  # streaming


# ---- in the viewer -------------------------------------------------------------------------------
def _dock(viewer, session=None, **kw):
    widget = MedplibWidget(viewer, session=session, **kw)
    viewer.window.add_dock_widget(widget, name="MedPLIB")
    return widget


def _wait_idle(qtbot, widget, timeout=10_000):
    qtbot.waitUntil(
        lambda: widget._worker is None and widget._loader is None and widget.segment_panel._worker is None,
        timeout=timeout,
    )


def _keys(viewer):
    return {str(k): func for k, func in viewer.keymap.items()}


@pytest.mark.viewer
def test_negative_clicks_with_one_key_in_another_colour(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    session = FakeSession()
    widget = _dock(viewer, session)
    panel = widget.segment_panel
    points = widget.pickers.add_points_layer()
    points.add([15, 15])
    assert panel.positive and "positive" in panel.negative.text()
    _keys(viewer)["T"](viewer)  # one key switches to negative clicks
    assert not panel.positive and "negative" in panel.negative.text()
    points.add([45, 60])
    assert points.features["positive"].tolist() == [True, False]
    colours = np.asarray(points.face_color)
    assert not np.allclose(colours[0], colours[1])  # drawn in two colours
    panel.segment()
    _wait_idle(qtbot, widget)
    (call,) = [c for c in session.calls if c[0] == "segment"]
    assert call[3] == [(15.0, 15.0), (45.0, 60.0)]
    _keys(viewer)["T"](viewer)
    assert panel.positive
    second = widget.pickers.add_points_layer()  # a new prompt layer starts with the current choice
    second.add([5, 5])
    assert second.features["positive"].tolist() == [True]


@pytest.mark.viewer
def test_the_prompt_layer_stays_active_in_add_mode(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, FakeSession())
    points = widget.pickers.add_points_layer()
    points.add([15, 15])
    widget.segment_panel.segment()
    _wait_idle(qtbot, widget)
    assert "cells prompt mask" in viewer.layers
    assert viewer.layers.selection.active is points and points.mode == "add"
    # the preview lies under the prompts, so the points stay visible
    assert viewer.layers.index("cells prompt mask") < viewer.layers.index(points)
    widget.segment_panel.commit()  # makes the output layer
    assert "cells MedPLIB" in viewer.layers
    assert viewer.layers.selection.active is points and points.mode == "add"
    viewer.layers.remove("cells MedPLIB")
    widget.chat.ask("Please segment the bright things")  # an answer makes the output layer again
    _wait_idle(qtbot, widget)
    assert "cells MedPLIB" in viewer.layers
    assert viewer.layers.selection.active is points and points.mode == "add"


@pytest.mark.viewer
def test_an_old_box_elsewhere_is_not_combined_with_a_new_click(make_napari_viewer, qtbot, blobs, notes):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    session = FakeSession()
    widget = _dock(viewer, session)
    widget.pickers.add_shapes_layer().add_rectangles(np.array([[38, 48], [52, 72]]))  # an old box
    points = widget.pickers.add_points_layer()
    points.add([15, 15])  # a click on the other blob
    widget.segment_panel.segment()
    _wait_idle(qtbot, widget)
    calls = [c for c in session.calls if c[0] == "segment"]
    assert len(calls) == 2
    assert any(box is None and pts == [(15.0, 15.0)] for _, _, box, pts in calls)
    assert any("outside every box" in m for _, m in notes)
    masks = widget.segment_panel.masks
    assert len(masks) == 2 and masks[1][15, 15] and not masks[1][45, 60]


@pytest.mark.viewer
def test_resegmenting_a_labelled_object_is_no_ring(make_napari_viewer, qtbot, blobs, notes):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, FakeSession())
    panel = widget.segment_panel
    points = widget.pickers.add_points_layer()
    points.add([15, 15])
    panel.segment()
    _wait_idle(qtbot, widget)
    panel.commit()
    out = viewer.layers["cells MedPLIB"]
    before = out.data.copy()
    assert before.max() == 1
    assert len(points.data) == 0  # Commit used the click: the next one starts a new object
    points.add([15, 15])
    panel.segment()  # the same object again
    _wait_idle(qtbot, widget)
    panel.commit()
    assert (out.data == before).all()  # no ring, no empty id
    assert any("already label 1" in m and "replace existing labels" in m for _, m in notes)
    assert panel.masks  # the preview stays, to be committed with replace
    widget.pickers.replace.setChecked(True)
    panel.commit()
    assert (out.data == before).all()  # label 1 redrawn with the same id, nothing left of the old outline
    assert "redrawing label 1" in widget.chat.entries[-1].text


@pytest.mark.viewer
def test_stop_while_the_model_loads_drops_the_question(make_napari_viewer, qtbot, blobs):
    release = threading.Event()
    loaded = []

    def factory(source, device="auto"):
        release.wait(10)
        session = FakeSession()
        loaded.append(session)
        return session

    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, session_factory=factory)
    widget.chat.ask("Describe this image.")
    assert widget._loader is not None and widget.chat.stop_button.isEnabled()
    widget.chat.stop_button.click()
    release.set()
    _wait_idle(qtbot, widget)
    assert loaded and not loaded[0].calls  # the queued question never ran
    assert "nothing will run" in widget.chat.plain_text()
    assert widget.chat.send_button.isEnabled()


@pytest.mark.viewer
def test_a_box_outside_the_image_is_named_and_the_question_stays(make_napari_viewer, qtbot, blobs, notes):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    session = FakeSession()
    widget = _dock(viewer, session)
    widget.pickers.add_shapes_layer().add_rectangles(np.array([[200, 300], [240, 360]]))
    widget.chat.input.setText("What is in <region>?")
    widget.chat.send()
    assert any("outside the image" in m for _, m in notes)
    assert not any("tick a" in m for _, m in notes)  # the layer is ticked: do not say otherwise
    assert widget.chat.input.text() == "What is in <region>?"  # kept, to be fixed and sent again
    assert not session.calls
    notes.clear()
    widget.segment_panel.segment()  # Segment names the problem too
    assert any("no prompt on this plane" in m and "outside the image" in m for _, m in notes)
    assert not session.calls


class EmptyMaskSession(FakeSession):
    """Answers with a mask token whose mask is empty."""

    def ask_stream(self, image, question, regions=(), **kwargs):
        stream = super().ask_stream(image, question, regions, **kwargs)
        inner = stream._pieces

        def gen():
            yield from inner
            return FakeReply("Sure, <SEG> .", [np.zeros(np.shape(image)[:2], bool)], [], question, self.model_name)

        stream._pieces = gen()
        return stream


@pytest.mark.viewer
def test_an_empty_mask_is_said_and_the_token_never_shows(make_napari_viewer, qtbot, blobs, notes):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, EmptyMaskSession())
    widget.chat.ask("Please segment the tumour.")
    _wait_idle(qtbot, widget)
    answer = widget.chat.entries[-1]
    assert "mask is empty" in answer.footer and "0 px" not in answer.footer
    assert any("mask is empty" in m for _, m in notes)
    text = widget.chat.plain_text()
    assert "<SEG>" not in text and "SEG" not in text and "empty mask" in text
    assert "cells MedPLIB" not in viewer.layers
    widget.set_session(FakeSession())
    widget.chat.ask("Please segment the bright things")  # a written mask is named by its label and layer
    _wait_idle(qtbot, widget)
    assert "label 1 in 'cells MedPLIB'" in widget.chat.plain_text()
    assert "[SEG]" not in widget.chat.plain_text()


@pytest.mark.viewer
def test_whole_stack_into_a_2d_output_is_refused(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.full((4, *SHAPE), 10, np.uint8), name="stack")
    flat = viewer.add_labels(np.zeros(SHAPE, np.int32), name="flat")
    session = FakeSession()
    widget = _dock(viewer, session)
    widget.pickers.set_output(flat)
    widget.stack.setChecked(True)
    widget.chat.input.setText("Please segment the bright square")
    widget.chat.send()
    assert any("merged" in m and "'flat'" in m for _, m in notes)
    assert not session.calls and not flat.data.any()
    assert widget.chat.input.text() == "Please segment the bright square"


@pytest.mark.viewer
def test_the_dock_fits_a_small_screen(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, FakeSession())
    # a 1280 x 800 window keeps most of its width for the canvas (the dock needed 538 px before)
    assert widget.minimumSizeHint().width() <= 360, widget.minimumSizeHint().width()
    assert widget.sizeHint().width() <= 400, widget.sizeHint().width()


def test_menu_and_widget_names_speak_plainly():
    from pathlib import Path

    import yaml

    import napari_medplib

    manifest = yaml.safe_load((Path(napari_medplib.__file__).parent / "napari.yaml").read_text())
    contributions = manifest["contributions"]
    names = [c["title"] for c in contributions["commands"]]
    names += [w["display_name"] for w in contributions["widgets"]]
    assert not [n for n in names if "(function)" in n or "function" in n.lower()]


@pytest.mark.viewer
def test_the_grounding_widget_shows_its_whole_title(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    dock, _ = viewer.window.add_plugin_dock_widget("napari-medplib", "Ground with MedPLIB")
    QApplication.processEvents()
    title = dock.titleBarWidget().title
    assert title.width() >= title.sizeHint().width(), (title.text(), title.width(), title.sizeHint().width())


@pytest.mark.viewer
def test_asking_again_for_a_labelled_object_writes_no_ring(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    widget = _dock(viewer, FakeSession())
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    out = viewer.layers["cells MedPLIB"]
    before = out.data.copy()
    out.data[15:20, 10:22] = 0  # the user erased part of it: a second answer would add a ring there
    out.refresh()
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    assert out.data.max() == 1 and not out.data[15:20, 10:22].any()
    assert "already labelled" in widget.chat.entries[-1].footer
    assert "already label 1" in widget.chat.plain_text()
    widget.pickers.replace.setChecked(True)  # with replace the answer is written (a new id)
    widget.chat.ask("Please segment the bright things")
    _wait_idle(qtbot, widget)
    assert ((out.data == 2) == (before == 1)).all()


@pytest.mark.viewer
def test_commit_never_clears_the_users_own_points(make_napari_viewer, qtbot, blobs):
    viewer = make_napari_viewer()
    viewer.add_image(blobs, name="cells")
    mine = viewer.add_points([[15, 15]], name="my clicks")
    widget = _dock(viewer, FakeSession())
    assert mine in widget.pickers.region_layers
    widget.segment_panel.segment()
    _wait_idle(qtbot, widget)
    widget.segment_panel.commit()
    assert viewer.layers["cells MedPLIB"].data[15, 15] == 1
    assert len(mine.data) == 1  # the user's own layer is never changed
