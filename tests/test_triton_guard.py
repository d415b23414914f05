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

_TEMPLATE = textwrap.dedent(
    """
    import sys
    import numpy as np
    {before}
    import napari
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((16, 16)))
    from qtpy.QtWidgets import QApplication
    QApplication.processEvents()
    if not any("libLLVM" in line for line in open("/proc/self/maps")):
        print("NO-MESA-LLVM"); sys.exit(0)
    {after}
    import transformers.activations  # imports torch._dynamo, which imports triton
    import triton
    print("LOADED", flush=True)
    viewer.close()
    """
)
MODEL = "import napari_medplib.model  # the guard runs here, before torch/transformers"
# the canvas first, then the model code; and the other order: the model code first (its guard finds no
# Mesa yet), then a canvas, then a model loads (what the widget tests do in one process, and a script may do)
SCRIPT = _TEMPLATE.format(before="", after=MODEL)
SCRIPT_CANVAS_LATER = _TEMPLATE.format(before=MODEL, after="")


@pytest.mark.viewer
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the clash is with Mesa's LLVM on Linux")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("script", [SCRIPT, SCRIPT_CANVAS_LATER], ids=["canvas-first", "canvas-later"])
def test_model_import_after_canvas_does_not_crash(script):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (run under Xvfb)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RTLD_DEEPBIND is a Linux flag")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_finder_wraps_only_tritons_native_library(monkeypatch):
    """Found as the path finder finds it, loaded with RTLD_DEEPBIND only while Mesa's LLVM is loaded."""
    from pathlib import Path

    from napari_medplib import _triton_guard

    finder = _triton_guard._DeepBindFinder()
    assert finder.find_spec("numpy", None) is None
    native_dir = str(Path(importlib.util.find_spec("triton").submodule_search_locations[0]) / "_C")
    spec = finder.find_spec(_triton_guard.NATIVE, [native_dir])
    assert isinstance(spec.loader, _triton_guard._DeepBindLoader)
    assert spec.loader.get_filename(_triton_guard.NATIVE).endswith(".so")  # delegated to the real loader

    seen = []

    class Inner:
        def create_module(self, spec):
            seen.append(sys.getdlopenflags())

    loader = _triton_guard._DeepBindLoader(Inner())
    flags = sys.getdlopenflags()
    for mesa in (True, False):
        monkeypatch.setattr(_triton_guard, "_mesa_llvm_loaded", lambda mesa=mesa: mesa)
        loader.create_module(None)
    assert seen == [flags | os.RTLD_DEEPBIND, flags] and sys.getdlopenflags() == flags
