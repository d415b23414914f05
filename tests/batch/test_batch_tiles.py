"""Large planes: windows read lazily, tiles cover the plane, objects stitched once each with unique ids."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from batch_helpers import BlobSession, blobs

from napari_medplib.batch import Actions, BatchOptions
from napari_medplib.batch.planes import PlaneReader
from napari_medplib.batch.tiles import (
    ground_tiled,
    read_labels,
    segment_windowed,
    tile_cores,
    tile_starts,
)


@pytest.mark.parametrize("size", [300, 1024, 1025, 2500, 4096])
def test_tiles_cover_the_plane_and_cores_partition_it(size):
    starts = tile_starts(size, 1024, 128)
    assert starts[0] == 0 and starts[-1] + min(1024, size) == size
    assert all(b - a <= 1024 - 128 for a, b in zip(starts, starts[1:], strict=False))  # overlap >= 128
    cores = tile_cores(starts, 1024, size)
    assert cores[0][0] == 0 and cores[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:], strict=False))
    assert all(s <= lo and hi <= s + 1024 for s, (lo, hi) in zip(starts, cores, strict=True))


def test_plane_reader_windows_equal_the_plane(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 60000, (3, 2, 300, 260), np.uint16)
    tifffile.imwrite(tmp_path / "s.ome.tif", stack, metadata={"axes": "ZCYX"}, ome=True, tile=(64, 64))
    reader = PlaneReader(tmp_path / "s.ome.tif", {"Z": 2})
    assert reader.shape == (300, 260)
    np.testing.assert_array_equal(reader.read(10, 90, 200, 260), np.moveaxis(stack[2, :, 10:90, 200:260], 0, -1))
    np.testing.assert_array_equal(reader.read(step=4), np.moveaxis(stack[2, :, ::4, ::4], 0, -1))
    one = PlaneReader(tmp_path / "s.ome.tif", {"Z": 1}, channel=1)
    np.testing.assert_array_equal(one.read(0, 5, 0, 5), stack[1, 1, :5, :5])


def _big_plane(tmp_path, shape=(700, 900)):
    rng = np.random.default_rng(3)
    centres = [(int(y), int(x)) for y, x in zip(rng.integers(10, shape[0] - 10, 60),
                                                 rng.integers(10, shape[1] - 10, 60), strict=True)]
    image = blobs(shape, centres, radius=5)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(128, 128))
    return path, image


def test_tiled_grounding_keeps_every_object_once(tmp_path):
    from skimage.measure import label

    path, image = _big_plane(tmp_path)
    options = BatchOptions(Actions(ground=("Please segment the nuclei.",)), tile_above=256, tile_size=256,
                           tile_overlap=48)
    session = BlobSession()
    reader = PlaneReader(path, {})
    dest = tmp_path / "out.zarr"
    result = ground_tiled(session, reader, "Please segment the nuclei.", dest, options, {})
    assert max(max(s) for s in session.asked) <= 256  # the model only ever saw tiles
    assert result.tiles == len(session.asked) == len(tile_starts(700, 256, 48)) * len(tile_starts(900, 256, 48))
    stitched = read_labels(dest)
    truth = label(image > 100)
    assert result.count == truth.max() == len(np.unique(stitched)) - 1 == len(result.table["label"])
    for k in range(1, truth.max() + 1):  # each true object is one stitched label, whole
        ids = np.unique(stitched[truth == k])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(stitched == ids[0], truth == k)
    assert sorted(result.table["label"]) == list(range(1, result.count + 1))
    assert not list(tmp_path.glob(".*tmp*"))
    meta = __import__("json").loads((dest / ".zattrs").read_text())
    assert meta["multiscales"][0]["datasets"][0]["path"] == "0" and "image-label" in meta


def test_windowed_segment_reads_only_windows(tmp_path, monkeypatch):
    path, image = _big_plane(tmp_path)
    reader = PlaneReader(path, {})
    reads = []
    original = reader.read

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        reads.append(out.size)
        return out

    monkeypatch.setattr(reader, "read", spy)
    options = BatchOptions(Actions(segment=True), tile_above=256)
    from skimage.measure import regionprops

    props = regionprops(__import__("skimage.measure").measure.label(image > 100))
    boxes = [tuple(float(v) for v in (p.bbox[0] - 3, p.bbox[1] - 3, p.bbox[2] + 2, p.bbox[3] + 2)) for p in props[:2]]
    prompts = [{"box": boxes[0]}, {"box": boxes[1]}]
    table = segment_windowed(BlobSession(), reader, prompts, tmp_path / "seg.zarr", options)
    labels = read_labels(tmp_path / "seg.zarr")
    assert set(np.unique(labels)) <= {0, 1, 2} and list(table["label"]) == [1, 2]
    assert max(reads[1:]) <= 256 * 256  # after the contrast overview, windows only
    y0, x0, y1, x1 = (int(v) for v in boxes[0])
    expected = np.zeros(labels.shape, bool)
    expected[y0:y1 + 1, x0:x1 + 1] = image[y0:y1 + 1, x0:x1 + 1] > 100
    np.testing.assert_array_equal(labels == 1, expected)
