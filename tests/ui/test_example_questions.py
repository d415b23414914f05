"""Example questions under the chat, the Describe button's wording, and how-many answers in the dock widget."""

import numpy as np
import pytest
from qtpy.QtCore import Qt
from ui_fakes import FakeReply, FakeSession, FakeStream

from napari_medplib.suggested_questions import is_trained_wording, suggested_questions
from napari_medplib.ui.widget import MedplibWidget

pytestmark = pytest.mark.viewer


def _dock(viewer, session):
    widget = MedplibWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget, name="MedPLIB")
    return widget


def _wait_idle(qtbot, widget, timeout=10_000):
    qtbot.waitUntil(lambda: widget._worker is None and widget._loader is None, timeout=timeout)


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for cy, cx in centres:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    return mask


CENTRES = [(20, 20), (20, 70), (60, 40), (70, 90), (40, 110)]


@pytest.fixture
def fluorescence():
    """Dark background, bright nuclei (uint16)."""
    noise = np.random.default_rng(0).normal(0, 4, (96, 128))
    return np.clip(100 + noise + 2000 * _discs((96, 128), CENTRES, 9), 0, None).astype(np.uint16)


@pytest.fixture
def he():
    """White background, pink stroma and purple nuclei (RGB uint8)."""
    img = np.full((96, 128, 3), 240, np.uint8)
    img[_discs((96, 128), [(48, 64)], 40)] = (235, 150, 200)
    img[_discs((96, 128), CENTRES, 9)] = (110, 70, 160)
    return img


@pytest.fixture
def brightfield():
    """Bright background, darker cells (uint8)."""
    return np.where(_discs((96, 128), CENTRES, 12), 110, 210).astype(np.uint8)


def test_chips_follow_the_chosen_image_and_fill_the_input(make_napari_viewer, qtbot, fluorescence, he, brightfield):
    viewer = make_napari_viewer()
    widget = _dock(viewer, FakeSession())
    assert widget.chat.example_questions == []  # no image: no chips
    assert is_trained_wording(widget.chat.input.placeholderText().removeprefix("e.g. "))

    viewer.add_image(fluorescence, name="dapi")
    assert widget.examples.kind == "fluorescence"
    assert widget.chat.example_questions == suggested_questions("fluorescence")
    assert widget.chat.input.placeholderText() == "e.g. How many nuclei are there?"
    assert not widget.chat.examples.isHidden()

    viewer.add_image(he, name="slide", rgb=True)  # a new image becomes the chosen one
    assert widget.pickers.image_layer.name == "slide"
    assert widget.examples.kind == "he"
    assert "Which stain does this image show?" in widget.chat.example_questions
    assert widget.chat.input.placeholderText() == "e.g. How many nuclei are there?"  # the shortest: it fits

    viewer.add_image(brightfield, name="bf")
    assert widget.chat.example_questions == suggested_questions("transmitted")
    assert widget.chat.input.placeholderText() == "e.g. How many cells are there?"

    viewer.add_image(np.zeros((32, 32), np.uint8), name="blank")  # nothing to go by
    assert widget.examples.kind == "unknown"
    assert widget.chat.example_questions == ["Describe the image in a few words.", "What type of imaging is this?"]
    assert widget.chat.input.placeholderText() == "e.g. What type of imaging is this?"

    widget.pickers.image.setCurrentIndex(0)  # back to the fluorescence image
    assert widget.chat.example_questions == suggested_questions("fluorescence")
    for question in widget.chat.example_questions:
        assert is_trained_wording(question)

    # clicking a chip puts its wording in the input, ready to send
    button = widget.chat.example_buttons[1]
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    assert widget.chat.input.text() == "Please segment the nuclei."

    for name in ("dapi", "slide", "bf", "blank"):
        viewer.layers.remove(name)
    assert widget.chat.example_questions == []
    assert widget.chat.examples.isHidden()


def test_chip_question_is_sent_as_worded(make_napari_viewer, qtbot, fluorescence):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence, name="dapi")
    session = FakeSession()
    widget = _dock(viewer, session)  # an image already there when the dock opens
    assert widget.chat.example_questions == suggested_questions("fluorescence")
    qtbot.mouseClick(widget.chat.example_buttons[0], Qt.MouseButton.LeftButton)
    qtbot.keyPress(widget.chat.input, Qt.Key.Key_Return)
    _wait_idle(qtbot, widget)
    assert session.calls[-1][2] == "How many nuclei are there?"


def test_describe_button_asks_the_trained_wording(make_napari_viewer, qtbot, fluorescence):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence, name="dapi")
    session = FakeSession()
    widget = _dock(viewer, session)
    qtbot.mouseClick(widget.chat.describe_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, widget)
    assert session.calls[-1][2] == "Describe the image in a few words."
    assert widget.history[-1]["question"] == "Describe the image in a few words."
    qtbot.mouseClick(widget.chat.region_button, Qt.MouseButton.LeftButton)  # no region: refused, not asked
    assert session.calls[-1][2] == "Describe the image in a few words."


def test_lazy_data_is_looked_at_off_the_qt_thread(make_napari_viewer, qtbot, fluorescence, monkeypatch):
    import threading

    import dask.array as da

    from napari_medplib.ui import examples

    threads = []
    real = examples.image_kind

    def spy(data, rgb):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(data, rgb)

    monkeypatch.setattr(examples, "image_kind", spy)
    viewer = make_napari_viewer()
    widget = _dock(viewer, FakeSession())
    stack = da.from_array(np.stack([fluorescence] * 3), chunks=(1, 48, 64))
    viewer.add_image(stack, name="lazy")
    qtbot.waitUntil(lambda: widget.chat.example_questions == suggested_questions("fluorescence"), timeout=10_000)
    assert threads == [False]
    viewer.add_image(fluorescence, name="in memory")  # numpy in memory: a strided look on the Qt thread
    assert widget.examples.kind == "fluorescence" and threads == [False, True]
    widget.pickers.image.setCurrentIndex(0)  # the lazy layer again: off the Qt thread again
    assert widget.examples.kind is None and widget.chat.example_questions == []  # no stale chips meanwhile
    qtbot.waitUntil(lambda: widget.examples.kind == "fluorescence", timeout=10_000)
    assert threads == [False, True, False]


class CountingSession(FakeSession):
    """Answers how-many questions as the engine does: the model's guess streams, then the final text states
    the measured count of the objects it grounded (``count_labels``), the model's words in ``model_text``."""

    def ask_stream(self, image, question, regions=(), **kwargs):
        if "how many" not in question.lower():
            return super().ask_stream(image, question, regions, **kwargs)
        from scipy import ndimage as ndi

        from napari_medplib.engine.counting import counted_answer

        self.calls.append(("ask", np.shape(image), question, len(regions)))
        image = np.asarray(image)
        labels = ndi.label(image > image.mean())[0].astype(np.int32)
        count = int(labels.max())
        if regions:  # the objects whose centroid lies in a region, as the engine counts them
            within = np.zeros(labels.shape, bool)
            for region in regions:
                within |= region.to_mask(labels.shape)
            centres = ndi.center_of_mass(labels > 0, labels, range(1, count + 1))
            count = sum(bool(within[round(y), round(x)]) for y, x in centres)

        def gen():
            yield "12"
            reply = FakeReply(counted_answer("12", "nuclei", count), [], list(regions), question, self.model_name)
            reply.model_text, reply.measured_count, reply.count_noun = "12", count, "nuclei"
            reply.count_labels = labels
            return reply

        return FakeStream(gen())


def test_how_many_states_the_count_once_and_writes_the_counted_objects(make_napari_viewer, qtbot, fluorescence):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence, name="dapi")
    widget = _dock(viewer, CountingSession())
    widget.chat.ask("How many nuclei are there?")
    _wait_idle(qtbot, widget)
    answer = widget.chat.entries[-1]
    assert answer.role == "assistant" and answer.done
    # the streamed guess ("12") is replaced by the final text, which states the measured count
    assert answer.text == "5 nuclei. (counted from the segmented objects; the model's own estimate was 12)"
    assert not any(e.text.startswith("Measured:") for e in widget.chat.entries)  # not said twice
    assert widget.chat.plain_text().count("5 nuclei") == 1
    # the counted objects are in the output Labels layer, one id each, with their table
    labels = widget.pickers.output_layer
    assert labels is not None and int(labels.data.max()) == 5
    assert len(np.unique(labels.data)) == 6
    assert labels.features["index"].tolist() == [1, 2, 3, 4, 5]
    assert "wrote 5 objects" in answer.footer


def test_how_many_in_a_region_writes_the_objects_it_counted(make_napari_viewer, qtbot, fluorescence):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence, name="dapi")
    viewer.add_shapes([[[0, 0], [45, 85]]], shape_type="rectangle", name="box")  # holds the first two centres
    widget = _dock(viewer, CountingSession())
    widget.chat.ask("How many nuclei are in <region>?")
    _wait_idle(qtbot, widget)
    answer = widget.chat.entries[-1]
    assert answer.text.startswith("2 nuclei.")
    data = widget.pickers.output_layer.data
    assert int(data.max()) == 2 and data[20, 20] and data[20, 70] and not data[60, 40]


def test_measured_note_only_when_the_text_does_not_state_the_count():
    from types import SimpleNamespace

    from napari_medplib.ui.instances_output import measured_note

    old = SimpleNamespace(text="12", measured_count=40, count_noun="nuclei")  # a server without the rewrite
    assert measured_note(old) == "Measured: 40 nuclei (grounded instances)"
    new = SimpleNamespace(text="40 nuclei. (counted from the segmented objects; the model's own estimate was 12)",
                          model_text="12", measured_count=40, count_noun="nuclei")
    assert measured_note(new) == ""
    assert measured_note(SimpleNamespace(text="40 nuclei.", measured_count=40, count_noun="nuclei")) == ""
    assert measured_note(SimpleNamespace(text="A cell.", measured_count=None, count_noun=None)) == ""


class DecliningSession(FakeSession):
    """Answers every question as the model does about an image unlike any microscopy it knows."""

    def ask_stream(self, image, question, regions=(), **kwargs):
        self.calls.append(("ask", np.shape(image), question, len(regions)))

        def gen():
            yield "I can't tell from this image."
            return FakeReply("I can't tell from this image.", [], list(regions), question, self.model_name)

        return FakeStream(gen())


def test_a_declined_answer_says_what_the_model_knows_and_what_to_do(make_napari_viewer, qtbot, brightfield):
    viewer = make_napari_viewer()
    viewer.add_image(brightfield, name="photo")
    widget = _dock(viewer, DecliningSession())
    widget.chat.ask("Describe the image in a few words.")
    _wait_idle(qtbot, widget)
    notes = [e.text for e in widget.chat.entries if e.role == "note"]
    assert any("does not recognise this image" in n and "Adapt to my images" in n for n in notes), notes
