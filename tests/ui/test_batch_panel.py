"""The dock's "Run on folder" section: a batch over a folder in a worker thread, results as layers."""

import numpy as np
import pytest
import tifffile

from napari_medplib.ui.widget import MedplibWidget

pytestmark = pytest.mark.viewer


def _folder(tmp_path, blobs, n=3):
    folder = tmp_path / "plates"
    folder.mkdir()
    for i in range(n):
        tifffile.imwrite(folder / f"well{i}.tif", np.roll(blobs, 3 * i, axis=1))
    return folder


def test_run_on_folder_writes_results_and_opens_them(make_napari_viewer_proxy, qtbot, blobs, fake_session, tmp_path):
    viewer = make_napari_viewer_proxy()
    widget = MedplibWidget(viewer, session=fake_session)
    viewer.window.add_dock_widget(widget, name="MedPLIB")
    panel = widget.batch_panel
    panel.folder.setText(str(_folder(tmp_path, blobs)))
    widget.chat.input.setText("Please segment the squares.")  # the chat's question is the default
    panel.run_button.click()
    assert panel.busy and panel.run_button.text() == "Stop"  # the Qt thread is free while it runs
    qtbot.waitUntil(lambda: not panel.busy, timeout=30_000)
    assert "3 done" in panel.status.text() and panel.progress.value() == 3
    out = tmp_path / "plates" / "medplib-results"
    assert (out / "objects.csv").is_file() and len(list((out / "labels").glob("*.tif"))) == 3
    assert '"Please segment the squares."' in (out / "run.json").read_text()
    assert panel.open_results() == 3
    added = [ly for ly in viewer.layers if type(ly).__name__ == "Labels"]
    assert len(added) == 3 and added[0].data.shape == blobs.shape and added[0].data.max() >= 1
    panel.run_button.click()  # the same run again: everything already done
    qtbot.waitUntil(lambda: not panel.busy, timeout=30_000)
    assert "0 done, 3 already done" in panel.status.text()


def test_no_folder_is_a_notification(make_napari_viewer_proxy, qtbot, fake_session, notes):
    viewer = make_napari_viewer_proxy()
    widget = MedplibWidget(viewer, session=fake_session)
    widget.batch_panel.run_button.click()
    assert not widget.batch_panel.busy
    assert any("choose a folder of images first" in message for _, message in notes)


def test_stop_ends_the_run_between_images(make_napari_viewer_proxy, qtbot, blobs, tmp_path):
    from ui_fakes import FakeSession

    viewer = make_napari_viewer_proxy()
    widget = MedplibWidget(viewer, session=FakeSession(delay=0.3))
    panel = widget.batch_panel
    panel.folder.setText(str(_folder(tmp_path, blobs, n=8)))
    panel.mode.setCurrentIndex(1)  # answers only
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.progress.value() >= 1, timeout=30_000)
    panel.run_button.click()  # Stop
    qtbot.waitUntil(lambda: not panel.busy, timeout=30_000)
    assert "(stopped)" in panel.status.text()
    assert len(list((tmp_path / "plates" / "medplib-results" / "items").glob("*.json"))) < 8

