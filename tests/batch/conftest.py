"""Fixtures for batch tests: a fake session with known objects, a tiny model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from batch_helpers import BlobSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # engine_helpers.force_seg


@pytest.fixture
def blob_session():
    return BlobSession()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-medplib")
