"""MedPLIB behind the family interface: the released checkpoints and the bundled model's extensions.

One adapter, `MedPLIBFamily` (``adapter.py``), wires small modules with one job each:

* ``features``: the plane as the model sees it and its CLIP / SAM / prefix caches (prepare the image);
* ``regions``: regions as the model reads them (grid cells; clicked objects, box objects, pixels on ours);
* ``generation``: template, token ids, the cached prefix and decoding;
* ``grounding``: ``<SEG>`` masks through SAM-Med2D, warnings, the Reply fields after the text;
* ``counting``: one label per object, and how-many answers measured by grounding the noun;
* ``segment``: direct prompts (points, box, mask prior) in a window at the model's scale;
* ``planes``: a batch of planes in one encoder and decoder pass.

The bundled model's extensions are switched by its config (``point_region_mask``, region geometry,
``seg_region_prompts``, the counter); a released checkpoint runs the reference's path through the same
code. Names are imported lazily: importing this package imports neither torch nor the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MedPLIBFamily", "load"]


def load(folder: Path, device: str, dtype: Any, on_progress=None) -> Any:
    """``MedPLIBModel`` from a released or our own folder, with load progress and the engine's errors."""
    from ...engine.loading import load_model

    return load_model(folder, device, dtype, on_progress)


def __getattr__(name: str) -> Any:
    if name == "MedPLIBFamily":
        from .adapter import MedPLIBFamily

        return MedPLIBFamily
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
