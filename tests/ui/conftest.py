"""Fixtures for the widget tests: isolated settings file, a fake session, a small image."""

import numpy as np
import pytest
from ui_fakes import FakeSession


@pytest.fixture(autouse=True)
def _settings_file(tmp_path, monkeypatch):
    """Never touch the user's real settings."""
    path = tmp_path / "medplib-settings.json"
    monkeypatch.setenv("NAPARI_MEDPLIB_SETTINGS", str(path))
    return path


@pytest.fixture
def fake_session():
    return FakeSession()


@pytest.fixture
def blobs():
    """64x80 uint16 image: two bright squares on a dark background."""
    img = np.full((64, 80), 100, dtype=np.uint16)
    img[10:20, 10:22] = 3000
    img[40:50, 50:70] = 2500
    return img


@pytest.fixture
def notes():
    """Messages napari notifications show during the test: list of (severity, message)."""
    from napari.utils.notifications import notification_manager

    seen = []

    def _on(event):
        n = event if hasattr(event, "message") else event.value
        seen.append((str(n.severity), n.message))

    notification_manager.notification_ready.connect(_on)
    yield seen
    notification_manager.notification_ready.disconnect(_on)
