"""The plugin must stay light: importing it (and its reader module) must not import torch, transformers or Qt."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "qtpy", "PyQt6", "PyQt5", "PySide6", "napari")


@pytest.mark.parametrize(
    "module", ["napari_medplib", "napari_medplib.io.napari_io", "napari_medplib.regions", "napari_medplib.cli",
               "napari_medplib.demo", "napari_medplib.paths"]
)
def test_import_is_light(module):
    code = (
        f"import sys, {module}\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {module} pulled in: {out.stdout.strip()}"


def test_lazy_public_names():
    import napari_medplib

    assert napari_medplib.__version__
    assert napari_medplib.Region.__name__ == "Region"
    with pytest.raises(AttributeError):
        napari_medplib.does_not_exist  # noqa: B018


def test_cli_parser_is_light():
    """Building the `medplib` parser (every subcommand's options, `--help`) imports no model library."""
    code = (
        "import sys\n"
        "from napari_medplib.cli import build_parser\n"
        "build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
