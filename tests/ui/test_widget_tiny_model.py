"""The widget with the real engine: a tiny random MedPLIB `Session` (napari_medplib.testing).

Random weights rarely emit <SEG>, so the fixture nudges the language model's logits: <SEG> first,
then end of answer. Everything else is the real path: prompt, region tokens, streaming, SEG hidden
state -> SAM-Med2D mask at image resolution, labels written by the widget.
"""

import numpy as np
import pytest

from napari_medplib.ui import grounding
from napari_medplib.ui.widget import MedplibWidget

pytestmark = pytest.mark.viewer


@pytest.fixture(scope="module")
def tiny():
    from napari_medplib.testing import tiny_session

    session = tiny_session()
    model = session.model
    seg, eos = model.tokenizer.seg_token_id, 2
    last = {"id": None}

    def remember_input(_module, inputs, _output):
        last["id"] = int(inputs[0].reshape(-1)[-1])

    def answer_seg_then_stop(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos if last["id"] == seg else seg] += 1e4
        return logits

    model.language_model.embed_tokens.register_forward_hook(remember_input)
    model.language_model.lm_head.register_forward_hook(answer_seg_then_stop)
    yield session
    session.close()


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 80)) * 500).astype(np.uint16)
    img[10:20, 10:22] += 3000
    return img


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy and widget._loader is None, timeout=20_000)


def test_grounded_answer_with_tiny_model(make_napari_viewer, qtbot, tiny, image):
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells", scale=(0.5, 0.5))
    viewer.add_shapes([[[8, 8], [22, 24]]], shape_type="rectangle", name="boxes", scale=(0.5, 0.5))
    widget = MedplibWidget(viewer, session=tiny)
    viewer.window.add_dock_widget(widget)
    widget.chat.ask("Please segment the cell in <region>.")
    _wait_idle(qtbot, widget)
    labels = viewer.layers["cells MedPLIB"]
    assert labels.data.shape == image.shape
    np.testing.assert_allclose(labels.scale, (0.5, 0.5))
    n = int(labels.data.max())  # one id per object of the grounded mask
    assert n >= 1 and labels.features["index"].tolist() == list(range(1, n + 1))
    answer = widget.chat.entries[-1]
    assert answer.role == "assistant" and "<SEG>" in answer.text
    assert "tiny-random-0" in answer.footer and "experts" in answer.footer
    assert ("label 1" in answer.footer) if n == 1 else (f"labels 1-{n}" in answer.footer)
    entry = labels.metadata["medplib"][-1]
    assert entry["model"] == "tiny-random-0" and entry["finish_reason"] == "eos"


def test_engine_input_errors_become_notifications(make_napari_viewer, qtbot, tiny, image, notes):
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = MedplibWidget(viewer, session=tiny)
    viewer.window.add_dock_widget(widget)
    widget.chat.ask("   ")  # the engine refuses an empty question
    _wait_idle(qtbot, widget)
    assert any("question is empty" in m for _, m in notes)
    assert widget.chat.send_button.isEnabled()


def test_direct_segment_and_function_widget_with_tiny_model(make_napari_viewer, qtbot, tiny, image):
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = MedplibWidget(viewer, session=tiny)
    viewer.window.add_dock_widget(widget)
    points = widget.pickers.add_points_layer()
    points.add([15, 15])
    widget.segment_panel.segment()
    qtbot.waitUntil(lambda: len(widget.segment_panel.masks) == 1, timeout=20_000)
    preview = viewer.layers["cells prompt mask"]
    assert preview.data.shape == image.shape and preview.data.any()
    labels = grounding.ground_data(
        image,
        "Please segment <region>",
        shapes=[np.array([[8.0, 8.0], [22.0, 24.0]])],
        session=tiny,
    )
    # one id per grounded object (the random model's mask may fall into several), numbered 1..n
    assert labels.shape == image.shape and labels.max() >= 1
    assert (np.unique(labels[labels > 0]) == np.arange(1, labels.max() + 1)).all()


def test_loads_a_model_folder_on_first_question(make_napari_viewer, qtbot, image, tmp_path):
    from napari_medplib.testing import make_tiny_model_folder
    from napari_medplib.ui import sessions

    folder = make_tiny_model_folder(tmp_path / "tiny-model")
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = MedplibWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_panel.source.setCurrentIndex(1)
    widget.model_panel.folder.setText(str(folder))
    widget.model_panel.folder.editingFinished.emit()
    widget.model_panel.device.setCurrentText("cpu")
    widget.chat.ask("Describe this image.")
    _wait_idle(qtbot, widget)
    assert widget.session is not None and widget.session.model_name == "tiny-model"
    assert "Model loaded: tiny-model on cpu" in widget.chat.plain_text()
    assert widget.chat.entries[-1].role == "assistant" and widget.chat.entries[-1].done
    # the function widget reuses the loaded session instead of loading a second copy
    assert sessions.shared((str(folder), "cpu")) is widget.session
    sessions.forget(widget.session)
    widget.session.close()


def test_int8_llm_weights_chosen_in_the_dock(make_napari_viewer, qtbot, image, tmp_path):
    """The model panel's LLM-weights choice loads a quantised language model, remembered and shared under
    its own key; for a server the choice is disabled (the server chose its weights)."""
    from napari_medplib.testing import make_tiny_model_folder
    from napari_medplib.ui import sessions
    from napari_medplib.ui.settings import load_settings, session_key

    folder = make_tiny_model_folder(tmp_path / "tiny-model")
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = MedplibWidget(viewer)
    panel = widget.model_panel
    panel.source.setCurrentIndex(panel.source.findData("folder"))
    panel.folder.setText(str(folder))
    panel.folder.editingFinished.emit()
    panel.device.setCurrentText("cpu")
    panel.llm_weights.setCurrentIndex(panel.llm_weights.findData("int8"))
    assert load_settings().llm_weights == "int8"
    widget.chat.ask("Describe this image.")
    _wait_idle(qtbot, widget)
    assert widget.session is not None and widget.session.fingerprint.endswith("+int8")
    assert widget.chat.entries[-1].role == "assistant" and widget.chat.entries[-1].done
    assert sessions.shared(session_key(str(folder), "cpu", "int8")) is widget.session
    assert sessions.shared(session_key(str(folder), "cpu")) is None
    panel.source.setCurrentIndex(panel.source.findData("server"))
    assert not panel.llm_weights.isEnabled() and not panel.device.isEnabled()
    sessions.forget(widget.session)
    widget.session.close()
