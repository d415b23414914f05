"""Kernel tests run on the GPU when there is one, else on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before any ``@triton.jit`` decoration runs,
i.e. before ``napari_medplib.kernels.*`` is imported, so it is set here, at collection time.
"""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

TRITON_MISSING = importlib.util.find_spec("triton") is None
SKIP_REASON = "triton is not installed (pip install triton==3.7.1; CPU runs use its interpreter)"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if TRITON_MISSING:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
        elif "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
