"""Which model family a folder holds, and what each family can do: the engine asks here, not the folder.

MedPLIB (released checkpoints and our own models) is the default; Med-MoE and Llama3-Med are told
apart by their config.json (no weights are opened, torch is not imported). A family that answers in
text only (no regions, no masks) is run by `engine.chat_session.ChatSession`; MedPLIB by `Session`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family: its display name, how to recognise and load a folder, what it can do."""

    key: str
    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Any] | None  # (folder, device, dtype) -> model with generate(); None: `Session`
    capabilities: dict[str, bool] = field(default_factory=dict)

    def lacks(self, capability: str) -> str | None:
        """Why a feature is not there ("Med-MoE answers in text: it has no mask decoder"), or None."""
        if self.capabilities.get(capability, False):
            return None
        reasons = {
            "masks": "it has no mask decoder; segmenting needs a MedPLIB model",
            "regions": "it does not read marked regions; ask about the whole image, or use a MedPLIB model",
        }
        return f"{self.name} answers in text: {reasons.get(capability, f'no {capability}')}"


def _medmoe_detect(folder: Path) -> bool:
    from .medmoe import detect

    return detect(folder)


def _medmoe_load(folder: Path, device: str, dtype: Any) -> Any:
    from .medmoe import load

    return load(folder, device=device, dtype=dtype)


def _llama3med_detect(folder: Path) -> bool:
    from .llama3med import detect

    return detect(folder)


def _llama3med_load(folder: Path, device: str, dtype: Any) -> Any:
    from .llama3med import load

    return load(folder, device=device, dtype=dtype)


MEDPLIB = Family("medplib", "MedPLIB", lambda folder: True, None,
                 {"regions": True, "masks": True, "streaming": True, "experts": True})
MEDMOE = Family("medmoe", "Med-MoE", _medmoe_detect, _medmoe_load,
                {"regions": False, "masks": False, "streaming": True, "experts": True})
LLAMA3MED = Family("llama3med", "Llama3-Med", _llama3med_detect, _llama3med_load,
                   {"regions": False, "masks": False, "streaming": True, "experts": False, "multiscale": True})
#: Checked in order; MedPLIB last (it is what any other MedPLIB-style folder is read as).
FAMILIES = (MEDMOE, LLAMA3MED, MEDPLIB)


def family_of(folder: str | Path) -> Family:
    """The family of a model folder (config.json decides; MedPLIB when nothing else claims it)."""
    path = Path(folder)
    for family in FAMILIES:
        if family.detect(path):
            return family
    return MEDPLIB
