"""A real `medplib serve` process on a free loopback port, with a tiny random model.

The server runs as ``python -m napari_medplib serve`` in a subprocess (no transport mocks); the
fixture reads the address from the line it prints and stops it in the finalizer. The tiny model's
end-of-answer token is one it never picks, so answers run to ``max_new_tokens``: a test decides how
long an answer takes, and a cancelled one cannot finish by itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serve_process import ServerProcess


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("serve") / "tiny", eos_token_id=906)


@pytest.fixture(scope="session")
def server(tiny_folder, tmp_path_factory):
    """The shared server: 16 MiB uploads at most, so the size tests need no big buffers."""
    token_file = tmp_path_factory.mktemp("serve-token") / "token"
    proc = ServerProcess(tiny_folder, token_file, "--max-upload-mb", "16").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def local(tiny_folder):
    """The same model in this process, for remote == local comparisons."""
    from napari_medplib.engine import Session

    session = Session.load(tiny_folder, device="cpu")
    yield session
    session.close()


@pytest.fixture
def remote(server):
    from napari_medplib.engine import Session

    session = Session.connect(server.url, token=server.token, timeout=60)
    yield session
    session.close()


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 80)) * 500).astype(np.uint16)
    img[10:20, 10:22] += 3000
    return img
