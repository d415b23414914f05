"""napari-medplib: MedPLIB (biomedical multimodal LLM with pixel-level insight) in napari.

Importing this package is cheap: it never imports torch, transformers or Qt. The heavy parts
(`Session`, the model) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .regions import Region

__all__ = ["Region", "Session", "__version__"]

_LAZY = {"Region": ".regions", "Session": ".engine"}


def __getattr__(name: str) -> Any:
    """Import public names lazily so that `import napari_medplib` stays light."""
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
