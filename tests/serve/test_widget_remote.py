"""The dock widget with "Server" in its Model settings, against a real `medplib serve` process."""

from __future__ import annotations

import json
import socket

import pytest

pytestmark = pytest.mark.viewer


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    path = tmp_path / "cfg" / "widget.json"
    monkeypatch.setenv("NAPARI_MEDPLIB_SETTINGS", str(path))
    return path


@pytest.fixture
def notes():
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def _on(event):
        n = event if hasattr(event, "message") else event.value
        seen.append((str(n.severity), n.message))

    notification_manager.notification_ready.connect(_on)
    yield seen
    notification_manager.notification_ready.disconnect(_on)


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy and widget._loader is None, timeout=30_000)


def test_widget_asks_through_the_server(make_napari_viewer, qtbot, server, local, image, settings_file, notes):
    from napari_medplib.serve.client import RemoteSession
    from napari_medplib.ui.settings import WidgetSettings, save_settings, token_path
    from napari_medplib.ui.widget import MedplibWidget

    save_settings(WidgetSettings(max_new_tokens=12))
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="cells")
    widget = MedplibWidget(viewer)
    viewer.window.add_dock_widget(widget)
    panel = widget.model_panel
    panel.source.setCurrentIndex(panel.source.findData("server"))  # what a user clicks and types
    panel.server_url.setText(server.url)
    panel.server_url.editingFinished.emit()
    panel.token.setText(server.token)
    panel.token.editingFinished.emit()
    assert not panel.device.isEnabled() and panel.token.isEnabled()

    widget.chat.ask("What is in the image?")
    _wait_idle(qtbot, widget)
    assert isinstance(widget.session, RemoteSession)
    want = local.ask(image, "What is in the image?", max_new_tokens=12,
                     contrast_limits=tuple(float(v) for v in layer.contrast_limits))
    answer = widget.chat.entries[-1]
    assert answer.role == "assistant" and answer.text.strip() == want.text.strip()
    assert not [m for s, m in notes if "error" in s.lower()]

    # the URL is remembered; the token only in its own user-only file
    saved = json.loads(settings_file.read_text())
    assert saved["source"] == "server" and saved["server_url"] == server.url
    assert server.token not in settings_file.read_text()
    assert token_path().read_text().strip() == server.token
    assert token_path().stat().st_mode & 0o777 == 0o600
    for item in viewer.layers:
        assert server.token not in repr(item.metadata)


def test_widget_server_failure_is_a_notification(make_napari_viewer, qtbot, image, settings_file, notes):
    from napari_medplib.ui.settings import WidgetSettings, save_settings
    from napari_medplib.ui.widget import MedplibWidget

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save_settings(WidgetSettings(source="server", server_url=f"http://127.0.0.1:{port}", max_new_tokens=4))
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = MedplibWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.chat.ask("What is in the image?")
    _wait_idle(qtbot, widget)
    messages = [m for _, m in notes]
    assert any(f"127.0.0.1:{port}" in m and "cannot reach" in m for m in messages), messages
    assert not any("Traceback" in m for m in messages)
    assert widget.session is None
