"""world_matrix reproduces napari's data -> world composition (checked against napari itself)."""

import numpy as np
import pytest

from napari_medplib.regions import RegionError, world_matrix
from napari_medplib.regions.transforms import as_matrix, plane_map

layers = pytest.importorskip("napari.layers")


def _apply(matrix, points):
    points = np.atleast_2d(points)
    return (np.c_[points, np.ones(len(points))] @ matrix.T)[:, :-1]


CASES = [
    {"scale": (2.0, 0.5)},
    {"translate": (10.0, -3.5)},
    {"rotate": 30.0},
    {"shear": [0.4]},
    {"scale": (1.5, 3.0), "translate": (4.0, 7.0), "rotate": -75.0, "shear": [0.2]},
    {"scale": (2, 2), "affine": np.array([[0.0, 1.0, 5.0], [-1.0, 0.0, 3.0], [0.0, 0.0, 1.0]])},
    {"scale": (4.0, 1.0, 2.0), "translate": (1.0, 2.0, 3.0), "rotate": (10.0, 20.0, 30.0)},
    {"rotate": [[0.0, -1.0], [1.0, 0.0]], "translate": (5, 5)},
]


@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")
@pytest.mark.parametrize("kw", CASES)
def test_world_matrix_matches_napari_layer_data_to_world(kw):
    kw = dict(kw)
    ndim = kw.pop("ndim", None) or max(
        [len(kw[k]) for k in ("scale", "translate") if k in kw]
        + [3 if np.ndim(kw.get("rotate")) == 1 else 2]
        + ([kw["affine"].shape[0] - 1] if "affine" in kw else [])
    )
    rng = np.random.default_rng(0)
    pts = rng.uniform(-50, 50, (5, ndim))
    layer = layers.Points(pts, **kw)
    theirs = np.array([layer.data_to_world(p) for p in pts])
    ours = _apply(world_matrix(**kw, ndim=ndim), pts)
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_short_vectors_broadcast_on_leading_axes_like_napari():
    from napari.utils.transforms import CompositeAffine

    theirs = CompositeAffine(scale=(2.0, 3.0), translate=(1.0,), rotate=15.0, ndim=4)
    ours = world_matrix(scale=(2.0, 3.0), translate=(1.0,), rotate=15.0, ndim=4)
    np.testing.assert_allclose(ours, theirs.affine_matrix, atol=1e-12)


def test_world_matrix_accepts_napari_affine_objects_and_mappings():
    layer = layers.Image(
        np.zeros((4, 4)), scale=(2, 3), translate=(1, 1), rotate=20, affine=np.diag([1.0, 2.0, 1.0])
    )
    from_layer = world_matrix(
        scale=layer.scale,
        translate=layer.translate,
        rotate=layer.rotate,
        shear=layer.shear,
        affine=layer.affine,
    )
    assert np.allclose(_apply(from_layer, [[1.0, 2.0]])[0], layer.data_to_world([1.0, 2.0]))
    mapping = as_matrix(
        {"scale": (2, 3), "translate": (1, 1), "rotate": 20, "affine": np.diag([1.0, 2, 1])}, 2
    )
    assert np.allclose(mapping, from_layer)
    assert np.allclose(as_matrix(None, 3), np.eye(4))
    small = as_matrix(
        np.array([[2.0, 0, 1], [0, 2.0, 1], [0, 0, 1]]), 3
    )  # 2-D matrix in 3-D: trailing axes
    assert np.allclose(_apply(small, [[7.0, 1.0, 1.0]]), [[7.0, 3.0, 3.0]])


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: as_matrix({"scael": (1, 1)}, 2), "unknown transform keys"),
        (lambda: world_matrix(rotate=np.zeros((2, 3))), "rotate"),
        (lambda: world_matrix(shear=[1.0, 2.0]), "shear"),
        (lambda: world_matrix(scale=(1, 1, 1), ndim=2), "ndim=2"),
        (lambda: world_matrix(affine=np.eye(3)[:2]), "affine"),
    ],
)
def test_bad_transforms_are_named(call, words):
    with pytest.raises(RegionError) as info:
        call()
    assert words in str(info.value)


def test_plane_map_needs_the_slice_for_nd_data_and_checks_its_range():
    with pytest.raises(RegionError, match="slice_point or slice_indices"):
        plane_map(3, (5, 10, 10))
    with pytest.raises(RegionError, match=r"viewer\.dims\.point"):
        plane_map(3, (10, 10))  # 3-D layer over a 2-D image: only a world point says where we are
    with pytest.raises(RegionError, match="outside the image"):
        plane_map(2, (5, 10, 10), slice_indices=(7,))
    with pytest.raises(RegionError, match="1 values"):
        plane_map(2, (5, 10, 10), slice_indices=(1, 2, 3, 4))
    pm = plane_map(
        2, (5, 10, 10), image_transform={"scale": (2, 1, 1)}, slice_point=(0.0, 6.2, 0.0, 0.0)
    )
    assert pm.current.tolist() == [3.0]  # world z 6.2 -> image index round(3.1)
