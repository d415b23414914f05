"""The engine's error types: ValueErrors with one-line messages that say what to do."""

from __future__ import annotations


class SessionInputError(ValueError):
    """Bad input to ``ask``/``segment`` (prompt outside the image, wrong shapes ...); one line, with the fix."""


class SessionClosedError(SessionInputError):
    """The session was closed; load a new one."""


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message names the source and the fix."""


class ModelNotFoundError(ModelLoadError):
    """No model where it was looked for (no bundled model, no such folder, not in the local cache)."""


class InvalidModelError(ModelLoadError):
    """The folder exists but is not a usable MedPLIB model folder."""


class DeviceError(ModelLoadError):
    """The requested device or dtype is not available here."""


class EmbeddingCacheMismatchError(SessionInputError):
    """An on-disk embedding file was computed for other data, another model or dtype."""
