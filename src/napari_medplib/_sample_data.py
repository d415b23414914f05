"""Sample data: a synthetic fluorescence image of nuclei with matching region layers.

File > Open Sample > MedPLIB gives an image and a Shapes layer (a box and an outline around two
nuclei) read from the GeoJSON next to it, so a new user can ask "What is in <region>?" or
"Please segment the nucleus in <region>." at once. The files were drawn once by
`write_sample_files` with `napari_medplib.train.synth` (16-bit camera values, so the contrast
handling is exercised too); they are small (< 200 kB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_DIR = Path(__file__).parent / "sample_data"
IMAGE_FILE = "nuclei.tif"
REGIONS_FILE = "nuclei_regions.geojson"
SEED = 7


def nuclei_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """npe2 sample-data command: the nuclei image plus its region annotations."""
    import tifffile

    from .io import read_geojson

    image = tifffile.imread(SAMPLE_DIR / IMAGE_FILE)
    layers: list[tuple[Any, dict[str, Any], str]] = [
        (image, {"name": "nuclei (synthetic)", "colormap": "gray"}, "image")
    ]
    for data, meta, kind in read_geojson(SAMPLE_DIR / REGIONS_FILE):
        meta = dict(meta, name="nuclei regions")
        if kind == "shapes":
            meta["edge_width"] = 2
        layers.append((data, meta, kind))
    return layers


def write_sample_files(folder: Path = SAMPLE_DIR) -> list[Path]:
    """Draw the sample image and its regions (run once; the output is shipped)."""
    import tifffile
    from skimage.measure import approximate_polygon, find_contours, regionprops

    from .io import shapes_to_geojson, write_geojson
    from .train.synth import make_sample

    sample = make_sample("nuclei", SEED, (256, 256), bit_depth=16)
    props = sorted(regionprops(sample.labels), key=lambda p: -p.area)
    inner = [p for p in props if min(p.bbox[:2]) > 20 and max(p.bbox[2:]) < 236]
    boxed, outlined = inner[0], inner[1]
    y0, x0, y1, x1 = boxed.bbox
    box = np.array([[y0 - 3, x0 - 3], [y0 - 3, x1 + 2], [y1 + 2, x1 + 2], [y1 + 2, x0 - 3]], float)
    contour = find_contours(np.pad(sample.labels == outlined.label, 1).astype(float), 0.5)[0] - 1
    polygon = approximate_polygon(contour, tolerance=0.8)[:-1]
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / IMAGE_FILE
    from .atomic import atomic_path

    with atomic_path(image_path) as tmp:
        tifffile.imwrite(tmp, sample.image, compression="zlib")
    doc = shapes_to_geojson(
        [box, polygon],
        {
            "shape_type": ["rectangle", "polygon"],
            "features": {"class": ["nucleus", "nucleus"]},
            "edge_color": np.array([[1.0, 0.8, 0.0, 1.0], [0.0, 0.9, 1.0, 1.0]]),
            "face_color": np.array([[1.0, 0.8, 0.0, 0.0], [0.0, 0.9, 1.0, 0.0]]),
        },
    )
    regions_path = folder / REGIONS_FILE
    write_geojson(regions_path, doc)
    return [image_path, regions_path]


if __name__ == "__main__":  # pragma: no cover
    print(*write_sample_files(), sep="\n")
