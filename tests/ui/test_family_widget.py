"""The dock with each model family's tiny model: the same question answered, the model named, and
the features a family lacks disabled with the reason."""

import os
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_medplib.ui.widget import MedplibWidget

pytestmark = pytest.mark.viewer
SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


def _session(family, tmp_path):
    from napari_medplib.engine import Session

    if family == "MedPLIB":
        from napari_medplib.testing import make_tiny_model_folder

        return Session.load(make_tiny_model_folder(tmp_path / "tiny-medplib"), device="cpu")
    env, name = {"Med-MoE": ("MEDMOE_TINY_REF", "medmoe-tiny-ref"),
                 "Llama3-Med": ("LLAMA3MED_TINY_REF", "llama3med-tiny-ref")}[family]
    return Session.load(os.environ.get(env) or SHARED / name, device="cpu")


@pytest.mark.parametrize("family", ["MedPLIB", "Med-MoE", "Llama3-Med"])
def test_each_family_answers_in_the_dock(family, make_napari_viewer_proxy, qtbot, tmp_path):
    viewer = make_napari_viewer_proxy()
    image = (np.random.default_rng(1).random((60, 72)) * 4000).astype(np.uint16)
    viewer.add_image(image, name="cells")
    session = _session(family, tmp_path)
    widget = MedplibWidget(viewer, session=session)
    widget.settings.max_new_tokens = 6
    qtbot.keyClicks(widget.chat.input, "What is the modality of this image?")
    qtbot.keyPress(widget.chat.input, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: widget._worker is None and widget._loader is None, timeout=60_000)
    transcript = widget.chat.plain_text()
    assert "What is the modality of this image?" in transcript
    assert session.model_name in transcript  # the answer's footer names the model that answered
    assert widget.segment_panel.isEnabled() is (family == "MedPLIB")
    if family != "MedPLIB":
        assert "no mask decoder" in widget.segment_panel.toolTip()
        assert family in widget.model_panel.status.text()
    session.close()
