import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medplib.image_files import ImageFileError, parse_plane_arg, read_plane


@pytest.fixture
def zcyx(tmp_path):
    data = np.arange(3 * 2 * 8 * 10, dtype=np.uint16).reshape(3, 2, 8, 10)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    return path, data


def test_tiff_stack_plane_and_channels(zcyx):
    path, data = zcyx
    plane, info = read_plane(path, plane={"Z": 2})
    assert info.axes == "ZCYX" and info.plane == {"Z": 2}
    np.testing.assert_array_equal(plane, np.moveaxis(data[2], 0, -1))  # channels last
    one, _ = read_plane(path, plane=1, channel=1)
    np.testing.assert_array_equal(one, data[1, 1])


def test_tiff_stack_needs_a_plane_choice(zcyx):
    path, _ = zcyx
    with pytest.raises(ImageFileError, match=r"--plane Z=0"):
        read_plane(path)
    with pytest.raises(ImageFileError, match="out of range"):
        read_plane(path, plane={"Z": 3})
    with pytest.raises(ImageFileError, match="no axis T"):
        read_plane(path, plane={"T": 0})
    with pytest.raises(ImageFileError, match="channel 5"):
        read_plane(path, plane=0, channel=5)


def test_plain_2d_and_rgb_tiff(tmp_path):
    grey = np.random.default_rng(0).random((6, 7)).astype(np.float32)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    np.testing.assert_array_equal(read_plane(tmp_path / "g.tif")[0], grey)
    rgb = np.random.default_rng(1).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tiff", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_plane(tmp_path / "c.tiff")[0], rgb)


def test_png_and_errors(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_plane(tmp_path / "a.png")[0], rgb)
    np.testing.assert_array_equal(read_plane(tmp_path / "a.png", channel=2)[0], rgb[..., 2])
    with pytest.raises(ImageFileError, match="no such file"):
        read_plane(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageFileError, match="not a readable image"):
        read_plane(tmp_path / "bad.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageFileError, match="not a readable TIFF"):
        read_plane(tmp_path / "bad.tif")
    (tmp_path / "x.xyz").write_bytes(b"")
    with pytest.raises(ImageFileError, match="unsupported file type"):
        read_plane(tmp_path / "x.xyz")


def test_parse_plane_arg():
    assert parse_plane_arg(None) is None
    assert parse_plane_arg("3") == 3
    assert parse_plane_arg("z=3, T=0") == {"Z": 3, "T": 0}
    with pytest.raises(ImageFileError):
        parse_plane_arg("Z:3")


def test_planar_samples_tiff_are_channels(tmp_path):
    data = np.arange(3 * 6 * 7, dtype=np.uint16).reshape(3, 6, 7)
    tifffile.imwrite(tmp_path / "p.tif", data, photometric="rgb", planarconfig="separate")  # one "SYX" page
    plane, _info = read_plane(tmp_path / "p.tif")
    np.testing.assert_array_equal(plane, np.moveaxis(data, 0, -1))
    np.testing.assert_array_equal(read_plane(tmp_path / "p.tif", channel=2)[0], data[2])
    with pytest.raises(ImageFileError, match="drop --plane"):
        read_plane(tmp_path / "p.tif", plane=1)
    with pytest.raises(ImageFileError, match="channel 3"):
        read_plane(tmp_path / "p.tif", channel=3)
