"""Loading a model after napari's OpenGL canvas exists must not crash when Triton is installed.

Mesa's libLLVM (Xvfb's software OpenGL) and Triton's own LLVM clash; without the guard the first
``import transformers`` after a canvas was drawn segfaulted (transformers -> torch._dynamo -> triton).
Runs in a subprocess: a crash there fails this test instead of killing the test session.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import napari
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((16, 16)))
    from qtpy.QtWidgets import QApplication
    QApplication.processEvents()
    if not any("libLLVM" in line for line in open("/proc/self/maps")):
        print("NO-MESA-LLVM"); sys.exit(0)
    import napari_medplib.model  # the guard runs here, before torch/transformers
    import transformers.activations  # imports torch._dynamo, which imports triton
    import triton
    print("LOADED", flush=True)
    viewer.close()
    """
)


@pytest.mark.viewer
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the clash is with Mesa's LLVM on Linux")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_model_import_after_canvas_does_not_crash():
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (run under Xvfb)")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    if "NO-MESA-LLVM" in done.stdout:
        pytest.skip("this OpenGL does not load Mesa's LLVM; nothing can clash")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "LOADED" in done.stdout


def test_guard_is_a_no_op_without_triton_or_mesa(monkeypatch):
    from napari_medplib import _triton_guard

    monkeypatch.setattr(_triton_guard, "_mesa_llvm_loaded", lambda: False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    flags = sys.getdlopenflags()
    assert _triton_guard.ensure_triton_loadable() is False
    assert "triton" not in sys.modules and sys.getdlopenflags() == flags
