"""Layer data -> regions: transforms, nD slicing, clipping and the skipped-item report."""


import numpy as np
import pytest
from skimage.draw import polygon2mask

from napari_medplib.regions import (
    Region,
    RegionError,
    RegionResult,
    regions_from_labels,
    regions_from_points,
    regions_from_shapes,
    world_matrix,
)

RECT = np.array([[10.0, 20.0], [10.0, 40.0], [30.0, 40.0], [30.0, 20.0]])


def _reasons(result):
    return [(s.index, s.reason) for s in result.skipped]


# ---- shapes --------------------------------------------------------------------------------------
def test_shape_types_and_class_names_in_the_identity_case():
    tri = np.array([[5.0, 5.0], [5.0, 15.0], [15.0, 5.0]])
    data = [
        RECT,
        tri,
        RECT + 20,
        np.array([[50.0, 2.0], [50.0, 60.0]]),
        np.array([[1.0, 1.0], [2, 8], [9, 9]]),
    ]
    types = ["rectangle", "polygon", "ellipse", "line", "path"]
    result = regions_from_shapes(
        data, types, {"class": ["a", "b", "c", None, ""]}, image_shape=(64, 64), name="S"
    )
    assert [r.kind for r in result] == ["box", "polygon", "polygon", "path", "path"]
    assert [r.label for r in result] == ["a", "b", "c", None, None]
    assert [r.index for r in result] == [0, 1, 2, 3, 4] and {r.source for r in result} == {"S"}
    assert result[0].bbox == (10, 20, 30, 40)
    assert np.array_equal(result[1].to_mask(), polygon2mask((64, 64), tri))
    rows, cols = np.indices((64, 64))
    ellipse = ((rows - 40) / 10) ** 2 + ((cols - 50) / 10) ** 2 <= 1
    ours = result[2].to_mask()
    assert not (ellipse & ~ours).any()  # the whole closed ellipse, rim pixels included
    assert (ours & ~ellipse).sum() <= 4  # and (almost) nothing beyond it
    assert result.skipped == ()


def test_two_vertex_rectangle_and_centre_radii_ellipse_forms():
    result = regions_from_shapes(
        [np.array([[10.0, 20.0], [30.0, 40.0]]), np.array([[32.0, 32.0], [4.0, 8.0]])],
        ["rectangle", "ellipse"],
        image_shape=(64, 64),
    )
    assert result[0].bbox == (10, 20, 30, 40)
    assert result[1].bbox == (28, 24, 36, 40)


def test_scale_and_translate_follow_napari(napari_layers):
    shapes = napari_layers.Shapes([RECT], shape_type="rectangle", scale=(2, 2), translate=(10, -4))
    image = napari_layers.Image(np.zeros((200, 200)), scale=(0.5, 0.5), translate=(1, 1))
    result = regions_from_shapes(
        shapes.data,
        shapes.shape_type,
        image_shape=image.data.shape,
        layer_transform=_matrix(shapes),
        image_transform=_matrix(image),
    )
    expected = np.array([image.world_to_data(shapes.data_to_world(v)) for v in RECT])
    assert result[0].kind == "box"
    assert np.allclose(result[0].coords, [expected.min(0), expected.max(0)])


@pytest.mark.parametrize("angle", [30.0, 90.0])
def test_rotated_rectangle_becomes_polygon_unless_axis_aligned(napari_layers, angle):
    image = napari_layers.Image(
        np.zeros((128, 128)), rotate=angle, translate=(5, -7), scale=(1.5, 1.5)
    )
    centre = np.asarray(image.data_to_world((64, 64)))
    world_rect = centre + np.array([[-20.0, -30.0], [-20.0, 30.0], [20.0, 30.0], [20.0, -30.0]])
    result = regions_from_shapes(
        [world_rect], "rectangle", image_shape=(128, 128), image_transform=_matrix(image)
    )
    corners = np.array([image.world_to_data(v) for v in world_rect])
    region = result[0]
    if angle == 90.0:
        assert region.kind == "box"
        assert np.allclose(region.coords, [corners.min(0), corners.max(0)])
    else:
        assert region.kind == "polygon"
        assert np.allclose(region.coords, corners)
        assert np.array_equal(region.to_mask(), polygon2mask((128, 128), corners))


def test_shapes_match_napari_own_rasterisation(napari_layers):
    tri = np.array([[5.5, 5.0], [5.0, 25.3], [25.0, 5.0]])
    layer = napari_layers.Shapes(
        [RECT, tri, RECT + 22.3, np.array([[50.0, 2.0], [57.0, 60.0]])],
        shape_type=["rectangle", "polygon", "ellipse", "path"],
    )
    ours = regions_from_shapes(layer.data, layer.shape_type, image_shape=(64, 64)).masks()
    theirs = layer.to_masks((64, 64))
    assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
    iou = (ours[2] & theirs[2]).sum() / (ours[2] | theirs[2]).sum()
    assert iou > 0.95
    assert (theirs[3] <= ours[3]).all() and ours[3].sum() > 2 * theirs[
        3
    ].sum()  # ours is the widened line


def test_3d_image_current_slice_only_and_2d_shapes_on_any_slice():
    on, off = np.c_[np.full(4, 2.0), RECT], np.c_[np.full(4, 3.0), RECT + 5]
    result = regions_from_shapes(
        [on, off], "rectangle", image_shape=(5, 64, 64), slice_indices=(2,)
    )
    assert [r.index for r in result] == [0]
    assert _reasons(result) == [(1, "other_slice")]
    for z in (0, 4):
        flat = regions_from_shapes([RECT], "rectangle", image_shape=(5, 64, 64), slice_indices=(z,))
        assert len(flat) == 1 and flat[0].bbox == (10, 20, 30, 40)
    with pytest.raises(RegionError, match="slice"):
        regions_from_shapes([on], "rectangle", image_shape=(5, 64, 64))
    tilted = np.c_[[1.0, 1.0, 3.0, 3.0], RECT]  # a plane across slices 1..3
    across = regions_from_shapes([tilted], "rectangle", image_shape=(5, 64, 64), slice_indices=(2,))
    assert _reasons(across) == [(0, "invalid")] and "several slices" in across.summary()


def test_slice_from_world_point_with_anisotropic_image(napari_layers):
    image = napari_layers.Image(np.zeros((5, 64, 64)), scale=(2.0, 1.0, 1.0))
    shapes = napari_layers.Shapes(
        [np.c_[np.full(4, 4.0), RECT], np.c_[np.full(4, 6.0), RECT]]
    )  # world z 4, 6
    result = regions_from_shapes(
        shapes.data,
        "rectangle",
        image_shape=(5, 64, 64),
        layer_transform=_matrix(shapes),
        image_transform=_matrix(image),
        slice_point=(4.0, 31.0, 31.0),
    )
    assert [r.index for r in result] == [
        0
    ]  # world z 4 -> image plane 2; the shape at world z 6 is plane 3


def test_4d_image_and_leading_axes():
    data = [
        np.c_[np.full(4, 1.0), np.full(4, 3.0), RECT],
        np.c_[np.zeros(4), np.full(4, 3.0), RECT],
    ]
    result = regions_from_shapes(
        data, "rectangle", image_shape=(2, 5, 64, 64), slice_indices=(1, 3)
    )
    assert [r.index for r in result] == [0]
    three_d = [
        np.c_[np.full(4, 3.0), RECT]
    ]  # a (Z, Y, X) layer over a (T, Z, Y, X) image: trailing axes
    assert (
        len(
            regions_from_shapes(
                three_d, "rectangle", image_shape=(2, 5, 64, 64), slice_indices=(0, 3)
            )
        )
        == 1
    )
    assert (
        len(
            regions_from_shapes(
                three_d, "rectangle", image_shape=(2, 5, 64, 64), slice_indices=(0, 2)
            )
        )
        == 0
    )
    rgb = regions_from_shapes([RECT], "rectangle", image_shape=(64, 48, 3), rgb=True)
    assert rgb.image_shape == (64, 48) and rgb[0].bbox == (10, 20, 30, 40)


def test_3d_shapes_over_a_2d_image_use_the_world_point():
    data = [np.c_[np.full(4, 7.0), RECT], np.c_[np.full(4, 8.0), RECT]]
    result = regions_from_shapes(
        data, "rectangle", image_shape=(64, 64), slice_point=(7.2, 0.0, 0.0)
    )
    assert [r.index for r in result] == [0]


# ---- clipping and the report ---------------------------------------------------------------------
def test_clipping_outside_empty_unsupported_and_invalid_are_reported():
    data = [
        RECT - 15,  # partly outside: clipped
        RECT + 500,  # wholly outside
        np.array([[3.2, 3.2], [3.2, 3.8], [3.8, 3.5]]),  # between pixel centres: empty
        RECT,  # unknown type
        np.array([[1.0, 1.0], [2.0, 2.0]]),  # polygon with 2 vertices
    ]
    result = regions_from_shapes(
        data,
        ["rectangle", "polygon", "polygon", "star", "polygon"],
        image_shape=(64, 64),
        name="Shapes",
    )
    assert result[0].bbox == (0, 5, 15, 25)
    assert _reasons(result) == [(1, "outside"), (2, "empty"), (3, "unsupported"), (4, "invalid")]
    messages = [s.message for s in result.skipped]
    assert messages[0] == "shape 1 (polygon) of 'Shapes' lies wholly outside the image (64x64)"
    assert "no pixel" in messages[1] and "'star'" in messages[2] and "at least 3" in messages[3]
    summary = result.summary()
    assert summary.startswith("1 region;") and "\n" not in summary and "wholly outside" in summary


def test_nothing_usable_raises_one_line_region_error():
    result = regions_from_shapes([RECT + 500], "rectangle", image_shape=(64, 64), name="S")
    assert len(result) == 0
    with pytest.raises(RegionError) as info:
        result.raise_if_empty()
    assert "no usable region" in str(info.value) and "wholly outside" in str(info.value)
    assert "\n" not in str(info.value) and info.value.skipped == result.skipped
    empty = regions_from_shapes([], image_shape=(64, 64), name="S")
    assert "'S' is empty" in empty.skipped[0].message
    assert regions_from_shapes([RECT], image_shape=(64, 64)).raise_if_empty()[0].kind == "box"


@pytest.mark.parametrize(
    ("data", "kwargs", "words"),
    [
        ([np.zeros((4, 2)), np.zeros((4, 3))], {}, "one D"),
        ([RECT], {"shape_type": ["rectangle", "ellipse"]}, "2 shape types for 1"),
        ([RECT], {"features": {"label": ["a", "b"]}}, "2 values for 1"),
        ([RECT], {"image_shape": (64,)}, "fewer than 2 spatial axes"),
    ],
)
def test_malformed_shapes_input_raises(data, kwargs, words):
    kwargs = {"image_shape": (64, 64), **kwargs}
    with pytest.raises(RegionError) as info:
        regions_from_shapes(data, **kwargs)
    assert words in str(info.value)


def test_results_combine_and_render_to_labels():
    a = regions_from_shapes([RECT], image_shape=(64, 64))
    b = regions_from_points([[5.0, 5.0]], image_shape=(64, 64), span=1)
    both = a + b
    assert len(both) == 2 and isinstance(both, RegionResult)
    labels = both.to_labels()
    assert (labels == 1).sum() == 21 * 21 and (labels == 2).sum() == 9
    with pytest.raises(RegionError, match="cannot combine"):
        a + regions_from_shapes([RECT], image_shape=(32, 64))


# ---- points --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "features",
    [
        {"label": ["positive", "negative", "positive"]},
        {"label": np.array([1, 0, 1])},
        {"positive": [True, False, True], "class": ["x", "y", "z"]},
        {"Positive": ["pos", "neg", "yes"]},
    ],
)
def test_point_polarity_from_features(features):
    result = regions_from_points([[5, 5], [10, 10], [20, 20]], features, image_shape=(64, 64))
    assert [r.positive for r in result] == [True, False, True]
    assert [r.point_labels.tolist() for r in result] == [[1], [0], [1]]


def test_point_features_from_a_dataframe_and_class_names_in_label():
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"label": ["tumour", "vessel"]})
    result = regions_from_points(np.array([[5.0, 5.0], [9.0, 9.0]]), frame, image_shape=(64, 64))
    assert [r.positive for r in result] == [True, True] and [r.label for r in result] == [
        "tumour",
        "vessel",
    ]
    with pytest.raises(RegionError, match="'positive' of point 1 is 'maybe'"):
        regions_from_points([[1, 1], [2, 2]], {"positive": ["yes", "maybe"]}, image_shape=(64, 64))


def test_points_slices_transforms_and_outside():
    data = np.array([[2.0, 5.0, 5.0], [3.0, 6.0, 6.0], [2.0, 70.0, 5.0], [2.0, 10.4, 20.6]])
    result = regions_from_points(
        data,
        image_shape=(5, 64, 64),
        slice_indices=(2,),
        layer_transform={"scale": (1, 2, 2)},
        name="P",
    )
    assert _reasons(result) == [(1, "other_slice"), (2, "outside")]
    assert np.allclose(result[0].points, [[10.0, 10.0]]) and np.allclose(
        result[1].points, [[20.8, 41.2]]
    )
    assert "point 2 of 'P' lies outside the image (64x64)" in result.summary()
    assert "1 on other slices ignored" in result.summary()
    assert (
        "'P' is empty"
        in regions_from_points(np.zeros((0, 2)), image_shape=(64, 64), name="P").summary()
    )


# ---- labels --------------------------------------------------------------------------------------
def test_labels_one_region_per_id_with_classes():
    lab = np.zeros((20, 30), np.int32)
    lab[2:5, 3:9] = 1
    lab[10:18, 20:25] = 7
    features = {"index": [0, 1, 7], "class": [None, "cell", "nucleus"]}
    result = regions_from_labels(lab, features, image_shape=(20, 30), name="L")
    assert [r.index for r in result] == [1, 7] and [r.label for r in result] == ["cell", "nucleus"]
    for region in result:
        assert region.kind == "mask" and np.array_equal(region.to_mask(), lab == region.index)


def test_labels_on_the_current_slice_and_rescaled_onto_the_image_grid():
    lab = np.zeros((3, 10, 10), np.uint16)
    lab[1, 2:4, 5:8] = 4
    lab[2, 0:2, 0:2] = 9
    result = regions_from_labels(
        lab, image_shape=(3, 20, 20), layer_transform={"scale": (1, 2, 2)}, slice_indices=(1,)
    )
    assert [r.index for r in result] == [4]
    # image pixel j has its centre at world j: labels pixel round(j / 2) (centres at integers)
    idx = np.floor(np.arange(20) / 2 + 0.5).astype(int)
    padded = np.pad(lab[1] == 4, ((0, 1), (0, 1)))  # index 10 lies outside the labels
    expected = padded[np.ix_(idx, idx)]
    assert np.array_equal(result[0].to_mask(), expected)
    none = regions_from_labels(lab, image_shape=(3, 20, 20), slice_indices=(0,), name="L")
    assert len(none) == 0 and "'L' has no labels on the current plane" in none.summary()


def test_rotated_labels_take_the_general_resampling_path():
    lab = np.zeros((12, 16), np.int32)
    lab[1:4, 2:11] = 3
    lab[6:12, 12:15] = 5
    # data -> world rotation of 90 degrees maps (r, c) to (-c, r); shift back into the image grid
    transform = world_matrix(rotate=90.0, translate=(15.0, 0.0))
    result = regions_from_labels(lab, image_shape=(16, 12), layer_transform=transform)
    rotated = np.rot90(lab)  # the same picture as the labels layer shows
    assert {r.index for r in result} == {3, 5}
    for region in result:
        assert np.array_equal(region.to_mask(), rotated == region.index)


class _LazyLabels:
    """Array-like that only allows basic slicing (like dask / zarr) and records what was read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        assert all(isinstance(k, (int, slice)) for k in key), "only basic slicing"
        self.reads.append(key)
        return self.array[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole labels volume was loaded")


@pytest.mark.parametrize("angle", [0.0, 90.0])
def test_3d_labels_read_only_the_current_plane(angle):
    volume = np.zeros((4, 12, 16), np.int32)
    volume[2, 1:4, 2:11] = 3
    volume[1, 6:12, 12:15] = 5
    lazy = _LazyLabels(volume)
    transform = world_matrix(rotate=angle, translate=(0.0, 15.0 if angle else 0.0, 0.0))
    shape = (4, 16, 12) if angle else (4, 12, 16)
    result = regions_from_labels(
        lazy, image_shape=shape, layer_transform=transform, slice_indices=(2,)
    )
    assert [r.index for r in result] == [3]
    picture = np.rot90(volume[2]) if angle else volume[2]
    assert np.array_equal(result[0].to_mask(), picture == 3)
    assert all(read[0] in (2, slice(2, 3)) for read in lazy.reads)  # only plane 2 was touched


def test_labels_partly_outside_are_clipped():
    lab = np.ones((10, 10), np.int32)
    result = regions_from_labels(lab, image_shape=(8, 8), layer_transform={"translate": (4, -3)})
    assert result[0].bbox == (4, 0, 7, 6)


# ---- scale (speed is measured by benchmarks/regions_convert.py, not here) ------------------------
def test_a_thousand_polygons_on_a_2048_image():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    shapes = [
        c + r * np.c_[np.sin(t), np.cos(t)]
        for c, r in zip(rng.uniform(0, 2048, (1000, 2)), rng.uniform(5, 40, 1000), strict=True)
    ]
    result = regions_from_shapes(
        shapes, "polygon", image_shape=(2048, 2048), layer_transform={"scale": (1, 1)}
    )
    labels = result.to_labels()
    assert len(result) + len(result.skipped) == 1000 and labels.max() == len(result)


# ---- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def napari_layers():
    return pytest.importorskip("napari.layers")


def _matrix(layer):
    """What the UI adapter passes: the layer's transform as one matrix (public attributes only)."""
    return world_matrix(
        scale=layer.scale,
        translate=layer.translate,
        rotate=layer.rotate,
        shear=layer.shear,
        affine=layer.affine.affine_matrix,
    )


def test_region_kinds_from_constructors_are_accepted_by_results():
    result = RegionResult((Region.box(0, 0, 3, 3),), (), (8, 8))
    assert result.masks()[0].sum() == 16
