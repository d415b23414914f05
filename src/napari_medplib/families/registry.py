"""Which model family a folder holds, what each family can do, and which adapter runs it.

MedPLIB (released checkpoints and our own models) is the default; Med-MoE and Llama3-Med are told
apart by their config.json (no weights are opened, torch is not imported). `engine.session.Session`
loads any of them and runs it through the family's adapter (`families.base.ModelFamily`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Capabilities


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: its display name, how to recognise and load a folder, its adapter, what it can do."""

    key: str
    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Any]  # (folder, device, dtype, on_progress) -> the model
    adapter: Callable[..., Any]  # (family, model, caches, template) -> a `families.base.ModelFamily`
    capabilities: Capabilities
    default: bool = False  # the plugin's own family: callers need not name it

    def lacks(self, capability: str) -> str | None:
        """Why a feature is not there ("Med-MoE answers in text: it has no mask decoder"), or None."""
        if self.capabilities.get(capability, False):
            return None
        reasons = {
            "masks": "it has no mask decoder; segmenting needs a MedPLIB model",
            "regions": "it does not read marked regions; ask about the whole image, or use a MedPLIB model",
        }
        return f"{self.name} answers in text: {reasons.get(capability, f'no {capability}')}"


def _medplib_load(folder: Path, device: str, dtype: Any, on_progress=None) -> Any:
    from .medplib import load

    return load(folder, device, dtype, on_progress)


def _medplib_adapter(*args: Any, **kwargs: Any) -> Any:
    from .medplib import MedPLIBFamily

    return MedPLIBFamily(*args, **kwargs)


def _medmoe_detect(folder: Path) -> bool:
    from .medmoe import detect

    return detect(folder)


def _medmoe_load(folder: Path, device: str, dtype: Any, on_progress=None) -> Any:
    from .medmoe import load
    from .text import loading

    with loading(on_progress):
        return load(folder, device=device, dtype=dtype)


def _medmoe_adapter(*args: Any, **kwargs: Any) -> Any:
    from .medmoe.adapter import MedMoEFamily

    return MedMoEFamily(*args, **kwargs)


def _llama3med_detect(folder: Path) -> bool:
    from .llama3med import detect

    return detect(folder)


def _llama3med_load(folder: Path, device: str, dtype: Any, on_progress=None) -> Any:
    from .llama3med import load
    from .text import loading

    with loading(on_progress):
        return load(folder, device=device, dtype=dtype)


def _llama3med_adapter(*args: Any, **kwargs: Any) -> Any:
    from .llama3med.adapter import Llama3MedFamily

    return Llama3MedFamily(*args, **kwargs)


MEDPLIB = Family("medplib", "MedPLIB", lambda folder: True, _medplib_load, _medplib_adapter,
                 Capabilities(regions=True, masks=True, streaming=True, experts=True), default=True)
MEDMOE = Family("medmoe", "Med-MoE", _medmoe_detect, _medmoe_load, _medmoe_adapter,
                Capabilities(regions=False, masks=False, streaming=True, experts=True))
LLAMA3MED = Family("llama3med", "Llama3-Med", _llama3med_detect, _llama3med_load, _llama3med_adapter,
                   Capabilities(regions=False, masks=False, streaming=True, experts=False, multiscale=True))
#: Checked in order; MedPLIB last (it is what any other MedPLIB-style folder is read as).
FAMILIES = (MEDMOE, LLAMA3MED, MEDPLIB)
#: The family of a model built in memory (`Session.from_model`) unless another is named.
DEFAULT = MEDPLIB


def family_of(folder: str | Path) -> Family:
    """The family of a model folder (config.json decides; MedPLIB when nothing else claims it)."""
    path = Path(folder)
    for family in FAMILIES:
        if family.detect(path):
            return family
    return MEDPLIB
