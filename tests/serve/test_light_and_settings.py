"""The serve package stays light to import; the widget keeps a server's token out of its settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "qtpy", "napari", "starlette", "uvicorn", "fastapi", "sse_starlette")


@pytest.mark.parametrize("module", ["napari_medplib.serve", "napari_medplib.serve.cli",
                                    "napari_medplib.serve.client", "napari_medplib.serve.wire"])
def test_serve_imports_are_light(module):
    code = f"import sys, {module}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {module} pulled in: {out.stdout.strip()}"


def test_server_setting_and_token_file(tmp_path, monkeypatch):
    from napari_medplib.ui.settings import (
        WidgetSettings,
        is_server_url,
        load_server_token,
        load_settings,
        save_server_token,
        save_settings,
        token_path,
    )

    path = tmp_path / "cfg" / "widget.json"
    monkeypatch.setenv("NAPARI_MEDPLIB_SETTINGS", str(path))
    settings = WidgetSettings(source="server", server_url="http://gpu:8765")
    assert settings.model_source == "http://gpu:8765" and is_server_url(settings.model_source)
    assert WidgetSettings(source="server").model_source is None and not is_server_url("/models/x")
    save_settings(settings)
    save_server_token("s3cret-token")
    assert load_settings().server_url == "http://gpu:8765" and load_settings().source == "server"
    assert "s3cret" not in path.read_text() and "token" not in json.loads(path.read_text())
    assert token_path().parent == path.parent and token_path().stat().st_mode & 0o777 == 0o600
    assert load_server_token() == "s3cret-token"
    save_server_token("")  # clearing the field forgets the token
    assert load_server_token() is None and not token_path().exists()
    path.write_text(json.dumps({"source": "server", "server_url": 5}))
    assert load_settings().server_url == ""  # a wrong value falls back to the default
