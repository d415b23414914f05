"""Where models are looked for. No network: every location is a local folder."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming extra model folders (os.pathsep-separated).
MODEL_PATH_ENV = "MEDPLIB_MODEL_PATH"


#: The application name of the per-user folders (``platformdirs``).
APP_NAME = "napari-medplib"


def user_model_dir() -> Path:
    """The per-user folder for downloaded or converted models: ``platformdirs``' user cache folder.

    ``~/.cache/napari-medplib/models`` on Linux (``$XDG_CACHE_HOME`` if set),
    ``~/Library/Caches/napari-medplib/models`` on macOS, ``%LOCALAPPDATA%\\napari-medplib\\Cache\\models``
    on Windows.
    """
    from platformdirs import user_cache_path

    return user_cache_path(APP_NAME, appauthor=False) / "models"


def bundled_model_dir() -> Path:
    """The small default model shipped inside the package (may be absent in a dev checkout)."""
    return Path(__file__).parent / "bundled_model"


def model_search_paths() -> list[Path]:
    """Folders searched, in order, when a model is named rather than given as a path."""
    extra = [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, user_model_dir(), bundled_model_dir()]
