"""Load Triton so that it cannot crash a process whose OpenGL already loaded Mesa's LLVM.

Triton's native library carries its own LLVM. When Mesa's ``libLLVM`` is already in the process
(software or AMD/Intel OpenGL: Xvfb, VMs, many Linux laptops; napari's canvas loads it), the dynamic
linker binds libtriton's LLVM symbols to Mesa's copy and the import segfaults. ``transformers``
imports ``torch._dynamo``, which imports Triton whenever it is installed (every CUDA build of torch
ships it), so the first model load inside napari crashed the viewer. Loading libtriton with
``RTLD_DEEPBIND`` makes it resolve its own symbols first. Nothing happens when Triton is absent,
already imported, or no Mesa LLVM is loaded.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _mesa_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def ensure_triton_loadable() -> bool:
    """Import Triton with ``RTLD_DEEPBIND`` if it would otherwise crash; True when that was done."""
    if not sys.platform.startswith("linux") or "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if importlib.util.find_spec("triton") is None or not _mesa_llvm_loaded():
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # a broken Triton install is torch's business (it treats it as absent)
        return False
    finally:
        sys.setdlopenflags(flags)
    return True
