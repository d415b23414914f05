"""The napari-free engine: `Session` loads one model and answers questions about image planes.

    session = Session.load("path/to/model")            # or None for the bundled default
    reply = session.ask(image, "What is in <region>?", regions=[Region.box(10, 10, 60, 80)])
    result = session.segment(image, points=[(40, 50)], point_labels=[1])

See ``session.py`` for the full contract (shared with the napari widget and the CLI).
"""

from .errors import (
    DeviceError,
    EmbeddingCacheMismatchError,
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
    SessionClosedError,
    SessionInputError,
)
from .reply import AskStream, Reply, SegmentResult
from .session import Session

__all__ = [
    "AskStream",
    "DeviceError",
    "EmbeddingCacheMismatchError",
    "InvalidModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "Reply",
    "SegmentResult",
    "Session",
    "SessionClosedError",
    "SessionInputError",
]
