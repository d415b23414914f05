"""napari's data -> world transforms as plain matrices, and the map from a layer onto the image.

napari composes a layer's transform as ``affine @ (rotate @ shear @ diag(scale) + translate)``
(``Layer._data_to_world``, ``CompositeAffine._make_linear_matrix`` in napari 0.9.2). Vectors shorter
than the layer's ndim are padded on the leading axes (scale with 1, translate with 0) and smaller
matrices sit in the bottom-right corner of an identity, so layers of different ndim line up on their
trailing axes. `world_matrix` rebuilds that composition with numpy only, so the UI adapter can pass
``world_matrix(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear,
affine=layer.affine.affine_matrix)`` and nothing here needs napari.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .region import RegionError

_TRANSFORM_KEYS = ("scale", "translate", "rotate", "shear", "affine")
_SLICE_TOL = 0.5 + 1e-6  # a vertex this close (image pixels) to the current plane lies on it


def _rotation(rotate: Any) -> np.ndarray:
    """napari's rotate input: an angle (2-D) or (yaw, pitch, roll) (3-D) in degrees, or a matrix."""
    if np.isscalar(rotate):
        theta = np.deg2rad(float(rotate))
        return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    arr = np.asarray(rotate, dtype=float)
    if arr.ndim == 1 and arr.size == 3:
        a, b, g = np.deg2rad(arr)
        r_a = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        r_b = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        r_g = np.array([[1, 0, 0], [0, np.cos(g), -np.sin(g)], [0, np.sin(g), np.cos(g)]])
        return r_a @ r_b @ r_g
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise RegionError(
            "rotate must be an angle in degrees, 3 angles or a square matrix, "
            f"got shape {arr.shape}"
        )
    return arr


def _shear(shear: Any) -> np.ndarray:
    """napari's shear input: upper-triangular values as a vector, or a full triangular matrix."""
    arr = np.asarray(shear, dtype=float)
    if arr.ndim == 1:
        n = round((1 + np.sqrt(8 * arr.size + 1)) / 2)
        if n * (n - 1) // 2 != arr.size:
            raise RegionError(
                f"shear vector of length {arr.size} is not the upper triangle of a square matrix"
            )
        mat = np.eye(n)
        mat[np.triu_indices(n, 1)] = arr
        return mat
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise RegionError(f"shear must be a vector or a square matrix, got shape {arr.shape}")
    return arr


def _embed(mat: np.ndarray, n: int) -> np.ndarray:
    """Put an m x m matrix bottom-right in an n x n identity (napari's trailing-axis alignment)."""
    if mat.shape[0] > n:
        raise RegionError(f"a {mat.shape[0]}-D matrix does not fit a {n}-D transform")
    full = np.eye(n)
    full[n - mat.shape[0] :, n - mat.shape[0] :] = mat
    return full


def world_matrix(
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    rotate: Any = None,
    shear: Any = None,
    affine: Any = None,
    *,
    ndim: int | None = None,
) -> np.ndarray:
    """Homogeneous (ndim+1, ndim+1) data -> world matrix, composed as napari does.

    ``affine`` is an (n+1, n+1) homogeneous matrix (or anything with an ``affine_matrix``
    attribute); ``ndim`` defaults to the largest dimensionality among the inputs (at least 2).
    """
    if affine is not None and hasattr(affine, "affine_matrix"):
        affine = affine.affine_matrix
    aff = None if affine is None else np.asarray(affine, dtype=float)
    rot = None if rotate is None else _rotation(rotate)
    shr = None if shear is None else _shear(shear)
    if aff is not None and (aff.ndim != 2 or aff.shape[0] != aff.shape[1] or aff.shape[0] < 2):
        raise RegionError(f"affine must be a square (ndim+1, ndim+1) matrix, got shape {aff.shape}")
    sizes = [2]
    sizes += [len(v) for v in (scale, translate) if v is not None]
    sizes += [m.shape[0] for m in (rot, shr) if m is not None]
    sizes += [aff.shape[0] - 1] if aff is not None else []
    n = max(sizes) if ndim is None else int(ndim)
    if max(sizes) > n:
        raise RegionError(f"transform has {max(sizes)} dimensions but ndim={n} was asked for")
    scale_vec = np.ones(n)
    if scale is not None and len(scale):
        scale_vec[n - len(scale) :] = np.asarray(scale, dtype=float)
    shift = np.zeros(n)
    if translate is not None and len(translate):
        shift[n - len(translate) :] = np.asarray(translate, dtype=float)
    linear = np.eye(n) if rot is None else _embed(rot, n)
    linear = linear @ (np.eye(n) if shr is None else _embed(shr, n)) @ np.diag(scale_vec)
    out = np.eye(n + 1)
    out[:n, :n] = linear
    out[:n, n] = shift
    if aff is not None:
        out = _embed(aff, n + 1) @ out
    return out


def as_matrix(transform: Any, ndim: int) -> np.ndarray:
    """Coerce a transform to an (ndim+1, ndim+1) matrix.

    Accepts None (identity), a homogeneous matrix (smaller ones are aligned on trailing axes), an
    object with ``affine_matrix`` (a napari ``Affine``), or a mapping of `world_matrix` keywords
    (``{"scale": ..., "translate": ..., "rotate": ..., "shear": ..., "affine": ...}``).
    """
    if transform is None:
        return np.eye(ndim + 1)
    if isinstance(transform, Mapping):
        unknown = set(transform) - set(_TRANSFORM_KEYS)
        if unknown:
            raise RegionError(
                f"unknown transform keys {sorted(unknown)}; use {', '.join(_TRANSFORM_KEYS)}"
            )
        return world_matrix(
            **{k: transform[k] for k in _TRANSFORM_KEYS if k in transform}, ndim=ndim
        )
    return world_matrix(affine=transform, ndim=ndim)


@dataclass(frozen=True)
class PlaneMap:
    """Maps one layer's data coordinates onto the current 2-D plane of the image, in its pixels.

    ``layer_to_image`` works in ``ndim_world`` dimensions, where a layer with fewer dimensions takes
    the current world position on its missing leading axes (so 2-D layers apply to every slice).
    ``current`` is the current position in image coordinates on the non-displayed axes: the shown
    plane's index on the image's own axes, world coordinates on leading axes the image lacks.
    """

    layer_to_image: np.ndarray  # (Dw+1, Dw+1)
    world_point: np.ndarray  # (Dw,)
    current: np.ndarray  # (Dw-2,)
    layer_ndim: int
    plane_shape: tuple[int, int]

    @property
    def ndim_world(self) -> int:
        return self.world_point.shape[0]

    def to_image(self, coords: np.ndarray) -> np.ndarray:
        """(N, layer_ndim) layer data coordinates -> (N, Dw) image coordinates."""
        coords = np.asarray(coords, dtype=float).reshape(-1, self.layer_ndim)
        full = np.empty((coords.shape[0], self.ndim_world + 1))
        full[:, : self.ndim_world - self.layer_ndim] = self.world_point[
            : self.ndim_world - self.layer_ndim
        ]
        full[:, self.ndim_world - self.layer_ndim : -1] = coords
        full[:, -1] = 1.0
        # einsum, not @: OpenBLAS is slow (and thread-hungry) for (N, 3) x (3, 3) products
        return np.einsum("nk,dk->nd", full, self.layer_to_image)[:, :-1]

    def off_plane(self, image_coords: np.ndarray) -> np.ndarray:
        """Bool per row: does this image-space point lie off the current plane?"""
        if self.current.size == 0:
            return np.zeros(image_coords.shape[0], dtype=bool)
        return np.any(np.abs(image_coords[:, :-2] - self.current) > _SLICE_TOL, axis=1)

    def crosses_plane(self, image_coords: np.ndarray) -> bool:
        """Do these points (one shape's vertices) lie on both sides of, or around, the plane?"""
        lead = image_coords[:, :-2]
        lo, hi = lead.min(axis=0), lead.max(axis=0)
        return bool(np.all((lo <= self.current + _SLICE_TOL) & (hi >= self.current - _SLICE_TOL)))

    def plane_to_layer(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with layer coords = A @ (row, col) + b for pixels of the current image plane."""
        try:
            inv = np.linalg.inv(self.layer_to_image)
        except np.linalg.LinAlgError:
            raise RegionError("the layer transform is singular (a zero scale?)") from None
        lead = np.concatenate([self.current, [0.0, 0.0, 1.0]])
        rows = inv[self.ndim_world - self.layer_ndim : self.ndim_world]
        return rows[:, -3:-1], rows @ lead


def plane_map(
    layer_ndim: int,
    image_shape: Sequence[int],
    *,
    layer_transform: Any = None,
    image_transform: Any = None,
    slice_point: Sequence[float] | None = None,
    slice_indices: Sequence[int] | None = None,
) -> PlaneMap:
    """The `PlaneMap` of one layer onto an image of spatial shape ``image_shape`` (no RGB axis)."""
    image_ndim = len(image_shape)
    if image_ndim < 2 or layer_ndim < 2:
        raise RegionError(
            f"need at least 2-D data, got image ndim {image_ndim} and layer ndim {layer_ndim}"
        )
    dw = max(layer_ndim, image_ndim)
    m_layer = _embed(as_matrix(layer_transform, layer_ndim), dw + 1)
    m_image = _embed(as_matrix(image_transform, image_ndim), dw + 1)
    try:
        to_image = np.linalg.solve(m_image, m_layer)
    except np.linalg.LinAlgError:
        raise RegionError(
            "the image transform is singular (a zero scale?); it cannot map back to pixels"
        ) from None
    world = _world_point(dw, image_shape, m_image, slice_point, slice_indices)
    current = np.linalg.solve(m_image, np.append(world, 1.0))[: dw - 2]
    own = np.arange(dw - 2) >= dw - image_ndim  # non-displayed axes the image itself has
    current[own] = np.round(current[own])  # the plane napari shows (np.round, as its slicer)
    for axis in np.nonzero(own)[0]:
        size = image_shape[axis - (dw - image_ndim)]
        if not 0 <= current[axis] < size:
            raise RegionError(
                f"the current slice lies outside the image: index {int(current[axis])} on axis "
                f"{axis - (dw - image_ndim)}, which has {size} planes"
            )
    return PlaneMap(
        to_image, world, current, layer_ndim, (int(image_shape[-2]), int(image_shape[-1]))
    )


def _world_point(dw, image_shape, m_image, slice_point, slice_indices) -> np.ndarray:
    """The current world position (length dw) from viewer.dims.point or image slice indices."""
    if dw == 2:
        return np.zeros(2)
    if slice_point is not None:
        point = np.asarray(slice_point, dtype=float).ravel()
        if point.size < dw:
            raise RegionError(
                f"slice_point has {point.size} values but the data are {dw}-D; "
                "pass viewer.dims.point"
            )
        return point[point.size - dw :]
    image_ndim = len(image_shape)
    if slice_indices is not None and image_ndim == dw:
        idx = np.asarray(slice_indices, dtype=float).ravel()
        if idx.size not in (image_ndim - 2, image_ndim):
            raise RegionError(
                f"slice_indices needs {image_ndim - 2} values (one per non-displayed image "
                f"axis), got {idx.size}"
            )
        full = np.zeros(image_ndim + 1)
        full[: image_ndim - 2] = idx[: image_ndim - 2]
        full[-1] = 1.0
        return (m_image @ full)[:-1]
    what = "slice_point (viewer.dims.point)" if image_ndim < dw else "slice_point or slice_indices"
    raise RegionError(f"the data are {dw}-D: give the current slice as {what}")
