"""Load Triton so that it cannot crash a process whose OpenGL already loaded Mesa's LLVM.

Triton's native library carries its own LLVM. When Mesa's ``libLLVM`` is already in the process
(software or AMD/Intel OpenGL: Xvfb, VMs, many Linux laptops; napari's canvas loads it), the dynamic
linker binds libtriton's LLVM symbols to Mesa's copy and the import segfaults. ``transformers``
imports ``torch._dynamo``, which imports Triton whenever it is installed (every CUDA build of torch
ships it), so the first model load inside napari crashed the viewer. Loading libtriton with
``RTLD_DEEPBIND`` makes it resolve its own symbols first. Nothing happens when Triton is absent,
already imported, or no Mesa LLVM is loaded.

The canvas may also appear *after* this package was imported and before Triton is (a script that
imports the model code, opens a viewer, then loads a model): so the guard also puts a finder on
``sys.meta_path`` that loads Triton's native library with ``RTLD_DEEPBIND`` whenever it is first
loaded while Mesa's LLVM is in the process, whoever imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

NATIVE = "triton._C.libtriton"  # the extension module that carries Triton's LLVM


def _mesa_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


class _DeepBindLoader(importlib.abc.Loader):
    """Wraps the extension loader: the shared library is opened with ``RTLD_DEEPBIND`` when Mesa's LLVM
    is loaded at that moment."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        if not _mesa_llvm_loaded():
            return self.inner.create_module(spec)
        flags = sys.getdlopenflags()
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
        try:
            return self.inner.create_module(spec)
        finally:
            sys.setdlopenflags(flags)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)

    def __getattr__(self, name):  # get_filename, is_package, ... as the extension loader answers them
        return getattr(self.inner, name)


class _DeepBindFinder(importlib.abc.MetaPathFinder):
    """Finds Triton's native library as the path finder does, with `_DeepBindLoader` as its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != NATIVE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            spec.loader = _DeepBindLoader(spec.loader)
        return spec


def install_finder() -> bool:
    """Put `_DeepBindFinder` first on ``sys.meta_path`` (once); False where it cannot matter."""
    if not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND") or NATIVE in sys.modules:
        return False
    if not any(isinstance(f, _DeepBindFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeepBindFinder())
    return True


def ensure_triton_loadable() -> bool:
    """Import Triton with ``RTLD_DEEPBIND`` if it would otherwise crash now, and make a later first
    import safe too (`install_finder`); True when Triton was imported here."""
    if not sys.platform.startswith("linux") or "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    install_finder()
    if not _mesa_llvm_loaded():
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
