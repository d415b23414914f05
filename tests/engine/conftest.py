"""Fixtures for the engine tests: tiny random models (offline, milliseconds) and call counters."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from napari_medplib.testing import make_tiny_model_folder, tiny_model


class CallCounter:
    """Wraps ``obj.name`` so that calls are counted (and still run)."""

    def __init__(self, monkeypatch, obj, name: str) -> None:
        self.calls = 0
        original = getattr(obj, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(obj, "method")`` -> a CallCounter with ``.calls``."""
    return lambda obj, name: CallCounter(monkeypatch, obj, name)


@pytest.fixture
def tiny_session():
    """A fresh Session around a fresh tiny random model (fp32, CPU)."""
    from napari_medplib.engine import Session

    session = Session.from_model(tiny_model(), name="tiny")
    yield session
    session.close()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """A tiny random model written to disk in our layout (loadable by Session.load / --model)."""
    return make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-medplib")


@pytest.fixture
def image16():
    """A 16-bit grey plane (non-square, so geometry mistakes show)."""
    rng = np.random.default_rng(0)
    image = (rng.random((90, 130)) * 3000 + 200).astype(np.uint16)
    image[20:50, 30:70] += 20000
    return image
