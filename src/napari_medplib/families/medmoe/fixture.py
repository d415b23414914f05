"""Where the Med-MoE reference test vectors are (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MEDMOE_FIXTURE_ENV", "medmoe_fixture_dir"]

#: Environment variable that points at a Med-MoE reference fixture folder (``medmoe-tiny-ref`` layout).
MEDMOE_FIXTURE_ENV = "MEDMOE_TINY_REF"


def medmoe_fixture_dir() -> Path:
    """``$MEDMOE_TINY_REF``, else ``../shared/fixtures/medmoe-tiny-ref`` next to the repository checkout.

    Not checked for existence: the parity tests fail, not skip, without it.
    """
    if os.environ.get(MEDMOE_FIXTURE_ENV):
        return Path(os.environ[MEDMOE_FIXTURE_ENV])
    repo = Path(__file__).resolve().parents[4]  # src/napari_medplib/families/medmoe/fixture.py -> repository root
    return repo.parent / "shared" / "fixtures" / "medmoe-tiny-ref"
