"""Widget settings remembered between napari sessions: a small JSON file in the user config dir.

``NAPARI_MEDPLIB_SETTINGS`` names another file (tests, shared machines). A missing, unreadable or
partly wrong file falls back to defaults key by key: settings never stop the widget from opening.

A model server's token is a secret: it is kept out of this JSON (and so out of layer metadata and
logs) in its own user-only (0600) file beside it, ``server-token``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SETTINGS_ENV = "NAPARI_MEDPLIB_SETTINGS"
DEVICES = ("auto", "cpu", "cuda", "mps")
SOURCES = ("bundled", "folder", "server")
LLM_WEIGHTS = ("full", "int8")  # what `Session.load(llm_weights=...)` accepts
TOKEN_FILE = "server-token"


@dataclass
class WidgetSettings:
    """What the dock widget remembers."""

    source: str = "bundled"  # "bundled" | "folder" | "server"
    folder: str = ""  # model folder when source == "folder"
    server_url: str = ""  # a `medplib serve` server when source == "server" (its token: `load_server_token`)
    device: str = "auto"
    llm_weights: str = "full"  # "int8": weight-only int8 language model (MedPLIB checkpoints; about half the memory)
    max_new_tokens: int = 256
    temperature: float = 0.0
    replace: bool = False  # overwrite existing labels
    live: bool = False  # live direct segmentation
    clip_to_box: bool = True  # direct segmentation keeps a box's mask inside the box (Session.segment)
    clicked_pieces: bool = True  # a click's mask keeps only its pieces under a positive click

    @property
    def model_source(self) -> str | None:
        """What `Session.load` takes: None for the bundled model, else the folder; for a server its URL
        (`is_server_url`), which `workers.load_job` connects to with `Session.connect`."""
        if self.source == "server" and self.server_url:
            return self.server_url
        return self.folder if self.source == "folder" and self.folder else None


def session_key(source: str | None, device: str, llm_weights: str = "full") -> tuple:
    """The key one loaded `Session` is shared under: (source, device), plus the LLM weights when not full."""
    return (source, device) if llm_weights == "full" else (source, device, llm_weights)


def is_server_url(source: object) -> bool:
    """Whether a model source names a server rather than a model."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def settings_path() -> Path:
    env = os.environ.get(SETTINGS_ENV)
    if env:
        return Path(env)
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-medplib", appauthor=False)) / "widget.json"


def _valid(name: str, value: object) -> bool:
    if name == "source":
        return value in SOURCES
    if name == "device":
        return value in DEVICES
    if name == "llm_weights":
        return value in LLM_WEIGHTS
    if name in ("folder", "server_url"):
        return isinstance(value, str)
    if name == "max_new_tokens":
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096
    if name == "temperature":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 2
    return isinstance(value, bool)


def load_settings(path: Path | None = None) -> WidgetSettings:
    """Read the settings; unknown keys and invalid values are ignored."""
    path = settings_path() if path is None else Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return WidgetSettings()
    if not isinstance(raw, dict):
        return WidgetSettings()
    known = {f.name for f in fields(WidgetSettings)}
    good = {k: v for k, v in raw.items() if k in known and _valid(k, v)}
    return WidgetSettings(**good)


def save_settings(settings: WidgetSettings, path: Path | None = None) -> Path | None:
    """Write the settings; returns the path, or None when the folder is not writable."""
    path = settings_path() if path is None else Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..atomic import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(settings), indent=2))
    except OSError:
        return None
    return path


def token_path() -> Path:
    """The server token's file, beside the settings file."""
    return settings_path().parent / TOKEN_FILE


def load_server_token() -> str | None:
    """The remembered server token (None: none saved)."""
    from ..serve.tokens import read_secret

    return read_secret(token_path())


def save_server_token(token: str) -> Path | None:
    """Remember ``token`` in a user-only (0600) file; an empty token deletes it. None when not writable."""
    path = token_path()
    try:
        if not token.strip():
            path.unlink(missing_ok=True)
            return path
        from ..serve.tokens import write_secret

        return write_secret(path, token.strip())
    except OSError:
        return None
