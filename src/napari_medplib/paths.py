"""Where models are looked for. No network: every location is a local folder."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming extra model folders (os.pathsep-separated).
MODEL_PATH_ENV = "MEDPLIB_MODEL_PATH"


def user_model_dir() -> Path:
    """The per-user folder for downloaded or converted models (XDG cache on Linux)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-medplib" / "models"


def bundled_model_dir() -> Path:
    """The small default model shipped inside the package (may be absent in a dev checkout)."""
    return Path(__file__).parent / "bundled_model"


def model_search_paths() -> list[Path]:
    """Folders searched, in order, when a model is named rather than given as a path."""
    extra = [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, user_model_dir(), bundled_model_dir()]
