import numpy as np
import pytest

from napari_medplib.imaging import ImageInputError, describe_plane, rescale_to_uint8, to_model_rgb


def test_uint8_rgb_passes_through_unchanged_and_is_a_copy():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    before = image.copy()
    out = to_model_rgb(image)
    np.testing.assert_array_equal(out, image)
    out[0, 0] = 0
    np.testing.assert_array_equal(image, before)


def test_rgba_drops_alpha():
    image = np.zeros((4, 4, 4), np.uint8)
    image[..., 0] = 10
    image[..., 3] = 99
    out = to_model_rgb(image)
    assert out.shape == (4, 4, 3)
    assert (out[..., 0] == 10).all() and (out[..., 1:] == 0).all()


def test_uint8_grey_becomes_three_equal_channels():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_model_rgb(image)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], image)


def test_uint16_uses_contrast_limits_and_clips():
    image = np.array([[100, 200, 300, 5000]], dtype=np.uint16)
    before = image.copy()
    out = to_model_rgb(image, contrast_limits=(100, 300))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 255])
    np.testing.assert_array_equal(image, before)


def test_float_percentiles_are_robust_to_outliers_and_nan():
    image = np.linspace(0.0, 1.0, 1000, dtype=np.float32).reshape(25, 40)
    image[0, 0] = 1e9  # a hot pixel must not wash out the image
    image[0, 1] = np.nan
    out = to_model_rgb(image)
    grey = out[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    # the middle of the ramp lands in the middle of the range despite the outlier
    assert 100 < int(grey[12, 20]) < 160


def test_two_channel_composite_uses_magenta_green():
    image = np.zeros((2, 2, 2), np.uint16)
    image[0, 0, 0] = 1000  # channel 0 only -> magenta
    image[1, 1, 1] = 1000  # channel 1 only -> green
    out = to_model_rgb(image, contrast_limits=[(0, 1000), (0, 1000)])
    np.testing.assert_array_equal(out[0, 0], [255, 0, 255])
    np.testing.assert_array_equal(out[1, 1], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])


def test_constant_image_does_not_divide_by_zero():
    out = to_model_rgb(np.full((3, 3), 7.0, np.float32))
    assert out.dtype == np.uint8 and out.shape == (3, 3, 3)
    assert np.unique(out).size == 1


def test_rescale_degenerate_range():
    np.testing.assert_array_equal(rescale_to_uint8(np.array([1, 2, 3]), (2, 2)), [0, 255, 255])


@pytest.mark.parametrize(
    ("shape", "words"),
    [((2, 3, 4, 5), "one 2-D plane"), ((3, 64, 64), "channels-first"), ((64, 64, 40), "stack")],
)
def test_bad_shapes_name_the_fix(shape, words):
    with pytest.raises(ImageInputError, match=words):
        to_model_rgb(np.zeros(shape, np.uint8))


def test_bad_limits_shape():
    with pytest.raises(ImageInputError, match="contrast_limits"):
        to_model_rgb(np.zeros((4, 4, 2), np.uint16), contrast_limits=[(0, 1)] * 3)


def test_describe_plane_guesses_rgb_like_napari():
    assert describe_plane(np.zeros((4, 4, 3), np.uint8)).rgb
    assert not describe_plane(np.zeros((4, 4, 3), np.uint16)).rgb
    assert describe_plane(np.zeros((4, 4, 3), np.uint16), rgb=True).rgb
