"""The npe2 manifest is valid, every python_name imports, and napari discovers the plugin."""

from importlib.metadata import entry_points
from pathlib import Path

import npe2

import napari_medplib

MANIFEST = Path(napari_medplib.__file__).parent / "napari.yaml"


def test_manifest_validates_with_imports():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    assert manifest.name == "napari-medplib"


def test_top_level_manifest_is_the_shipped_one():
    top = Path(__file__).parents[1] / "napari.yaml"
    assert top.read_text() == MANIFEST.read_text()


def test_entry_point_registered():
    eps = entry_points(group="napari.manifest")
    assert any(ep.name == "napari-medplib" and ep.value == "napari_medplib:napari.yaml" for ep in eps)


def test_plugin_manager_lists_plugin():
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert pm.get_manifest("napari-medplib").name == "napari-medplib"
    readers = {r.command for r in pm.iter_compatible_readers(["cells.geojson"])}
    assert "napari-medplib.get_geojson_reader" in readers
