"""Compressed TIFFs as microscopes and Fiji write them open; damaged ones fail with a readable error."""

import numpy as np
import pytest
import tifffile

from napari_medplib.image_files import ImageFileError, read_plane

pytest.importorskip("imagecodecs")

IMAGE = (np.add.outer(np.arange(64), np.arange(80)) * 37 % 4096).astype(np.uint16)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", "packbits", "lzma"])
def test_lossless_compressed_tiff_reads_exactly(tmp_path, compression):
    path = tmp_path / f"frame_{compression}.tif"
    tifffile.imwrite(path, IMAGE, compression=compression)
    data, _info = read_plane(path)
    np.testing.assert_array_equal(data, IMAGE)


def test_jpeg_compressed_rgb_tiff_and_compressed_ome_stack(tmp_path):
    smooth = np.add.outer(np.arange(64), np.arange(80))  # JPEG is lossy: a smooth image
    rgb = np.stack([smooth, 200 - smooth, np.full_like(smooth, 128)], axis=-1).astype(np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb, compression="jpeg", photometric="rgb")
    data, _ = read_plane(path)
    assert data.shape == rgb.shape and np.abs(data.astype(int) - rgb).mean() < 4
    stack = np.stack([IMAGE, IMAGE[::-1]])
    ome = tmp_path / "stack.ome.tif"
    tifffile.imwrite(ome, stack, compression="zlib", metadata={"axes": "ZYX"})
    data, _info = read_plane(ome, plane={"Z": 1})
    np.testing.assert_array_equal(data, IMAGE[::-1])


def test_missing_imagecodecs_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, IMAGE, compression="lzw")

    def without_codecs(self, *args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", without_codecs)
    with pytest.raises(ImageFileError, match=r"frame.tif: its LZW compression needs the 'imagecodecs' package; .*pip install imagecodecs"):
        read_plane(path)


def test_tiny_tiff_declaring_a_huge_plane_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), compression="zlib")
    data = bytearray(path.read_bytes())
    tif = tifffile.TiffFile(path)
    width, length = tif.pages[0].tags["ImageWidth"], tif.pages[0].tags["ImageLength"]
    for tag in (width, length):  # 4 -> 60000 in place (both are SHORT or LONG values)
        size = 2 if tag.dtype == 3 else 4
        data[tag.valueoffset : tag.valueoffset + size] = (60000).to_bytes(size, "little")
    tif.close()
    path.write_bytes(bytes(data))
    with pytest.raises(ImageFileError, match=r"huge.tif: a plane of shape .*the file is damaged"):
        read_plane(path)


def test_tiff_whose_page_chain_loops_fails_quickly():
    """A fuzzed file whose second page points back at itself: tifffile built the series forever."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "damaged" / "tiff_circular_pages.tif"
    with pytest.raises(ImageFileError, match=r"tiff_circular_pages.tif: not a readable TIFF file"):
        read_plane(path)


@pytest.mark.parametrize("name", ["png_idat_past_end.png", "tiff_strip_past_end.tif"])
def test_chunk_declaring_bytes_past_the_end_allocates_nothing_like_it(name):
    """Fuzzed files: a 76-byte PNG whose IDAT declares 16 MB, a TIFF strip declaring 1.7 GB."""
    import tracemalloc
    from pathlib import Path

    path = Path(__file__).parent / "data" / "damaged" / name
    read_plane(Path(__file__).parent / "data" / "damaged" / "png_idat_past_end.png")  # imports
    tracemalloc.start()
    try:
        read_plane(path)
    except ImageFileError as exc:
        assert "damaged or truncated" in str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 2**20, peak
