"""Region annotation files <-> napari layer data, without napari.

Readers return napari LayerData tuples ``(data, meta, layer_type)``; writers take a layer's data and
state dict. The npe2 entry points live in :mod:`napari_medplib.io.napari_io`.

Formats: QuPath GeoJSON (read/write), ImageJ/Fiji ``.roi`` and RoiSet ``.zip`` (read), COCO JSON
(read). Coordinates follow napari: (row, col) = (y, x) in image data pixels; the files' (x, y) are
swapped and not shifted (QuPath, ImageJ and COCO put pixel corners at integer coordinates, napari
puts pixel centres there, so vector shapes sit half a pixel up-left of where those tools draw them;
files round-trip exactly and match other napari plugins). The Labels writer is the exception: it
traces pixel edges in QuPath's convention so that QuPath shows the outlines on exactly the
labelled pixels.
"""

from ._common import LayerData, RegionFileError
from .coco import read_coco
from .geojson_read import read_geojson
from .geojson_write import labels_to_geojson, points_to_geojson, shapes_to_geojson, write_geojson
from .imagej import read_imagej

__all__ = [
    "LayerData",
    "RegionFileError",
    "labels_to_geojson",
    "points_to_geojson",
    "read_coco",
    "read_geojson",
    "read_imagej",
    "shapes_to_geojson",
    "write_geojson",
]
