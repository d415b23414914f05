"""napari Points / Shapes / Labels layer *data* -> `Region`s on the current plane of an image.

Every converter takes the layer's data (and features), the layer's data -> world transform, the
image's spatial shape and data -> world transform, and the current slice; it returns a
`RegionResult` whose ``skipped`` entries say, in words, what was left out and why. Nothing here
imports napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .annotations import annotation_columns, merge_annotations
from .region import POINT_SPAN, Region, RegionError
from .result import RegionResult, Skipped
from .transforms import plane_map

CLASS_COLUMNS = ("label", "class", "class_name", "classification", "category", "name")
_POSITIVE = {"positive", "pos", "+", "1", "1.0", "true", "yes", "foreground", "fg"}
_NEGATIVE = {"negative", "neg", "-", "0", "0.0", "false", "no", "background", "bg"}
_SHAPE_TYPES = {
    "rectangle": "rectangle",
    "rect": "rectangle",
    "ellipse": "ellipse",
    "polygon": "polygon",
    "path": "path",
    "polyline": "path",
    "line": "line",
}


# ---- features ------------------------------------------------------------------------------------
def _column(features: Any, names: Sequence[str], n: int) -> tuple[str | None, np.ndarray | None]:
    """First of ``names`` (any case) in a dict / DataFrame of features, as an array of length n."""
    if features is None:
        return None, None
    keys = list(features.columns) if hasattr(features, "columns") else list(features.keys())
    lower = {str(k).lower(): k for k in keys}
    for name in names:
        if name.lower() in lower:
            key = lower[name.lower()]
            values = np.asarray(features[key], dtype=object).ravel()
            if values.size != n:
                raise RegionError(
                    f"feature {key!r} has {values.size} values for {n} items; they must match"
                )
            return str(key), values
    return None, None


def _class_name(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    return str(value.item() if hasattr(value, "item") else value)


def _polarity(value: Any) -> bool | None:
    """True/False for positive/negative spellings (bool, 1/0, 'positive', 'neg', ...), else None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value.item() if hasattr(value, "item") else value).strip().lower()
    return True if text in _POSITIVE else False if text in _NEGATIVE else None


def _point_polarity(features: Any, n: int) -> tuple[list[bool], tuple[str, ...]]:
    """Per-point polarity, and the feature columns still free to hold class names."""
    pol_key, pol = _column(features, ("positive",), n)
    if pol is not None:
        polarity = [_polarity(v) for v in pol]
        if None in polarity:
            i = polarity.index(None)
            raise RegionError(
                f"feature {pol_key!r} of point {i} is {pol[i]!r}; "
                "use positive/negative, 1/0 or True/False"
            )
        return polarity, CLASS_COLUMNS
    _, lab = _column(features, ("label",), n)
    polarity = [_polarity(v) for v in lab] if lab is not None else []
    if lab is not None and None not in polarity:  # a 'label' column of polarity, not of class names
        return polarity, tuple(c for c in CLASS_COLUMNS if c != "label")
    return [True] * n, CLASS_COLUMNS


# ---- shared plumbing -----------------------------------------------------------------------------
def _plane_shape(image_shape: Sequence[int], rgb: bool) -> tuple[int, ...]:
    spatial = tuple(int(s) for s in image_shape)[: -1 if rgb else None]
    if len(spatial) < 2:
        raise RegionError(
            f"image shape {tuple(image_shape)} has fewer than 2 spatial axes (rgb={rgb})"
        )
    return spatial


def _who(kind: str, index: int | None, name: str | None, detail: str | None = None) -> str:
    text = kind if index is None else f"{kind} {index}"
    text += "" if detail is None else f" ({detail})"
    return text if name is None else f"{text} of {name!r}"


def _size(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _check(region: Region, who: str, index: int, skipped: list[Skipped]) -> Region | None:
    """Keep a region with pixels in the image; else record whether it lies outside or is empty."""
    if region.area:
        return region
    r0, c0, r1, c1 = region._window()
    plane = region.image_shape
    if r1 < 0 or c1 < 0 or r0 >= plane[0] or c0 >= plane[1]:
        skipped.append(
            Skipped(index, "outside", f"{who} lies wholly outside the image ({_size(plane)})")
        )
    else:
        skipped.append(
            Skipped(
                index, "empty", f"{who} covers no pixel centre of the image (too small or thin)"
            )
        )
    return None


# ---- converters ----------------------------------------------------------------------------------
def regions_from_points(
    data: Any,
    features: Any = None,
    *,
    image_shape: Sequence[int],
    layer_transform: Any = None,
    image_transform: Any = None,
    slice_point: Sequence[float] | None = None,
    slice_indices: Sequence[int] | None = None,
    rgb: bool = False,
    span: int = POINT_SPAN,
    name: str | None = None,
) -> RegionResult:
    """Points layer data (N, D) -> one point `Region` per point on the current plane.

    Polarity comes from a ``positive`` feature, else from a ``label`` feature whose values all read
    as positive/negative (``positive``/``negative``, 1/0, True/False, ...); class names from
    ``class``, ``name``, ... (or ``label`` when it is not polarity). A point whose pixel lies
    outside the image is skipped.
    """
    spatial = _plane_shape(image_shape, rgb)
    pts = np.asarray(data, dtype=float)
    pts = pts.reshape(0, len(spatial)) if pts.size == 0 else np.atleast_2d(pts)
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise RegionError(f"points data must be an (N, D) array with D >= 2, got shape {pts.shape}")
    n, plane = pts.shape[0], spatial[-2:]
    if n == 0:
        return RegionResult(
            (), (Skipped(None, "empty", f"{_who('points layer', None, name)} is empty"),), plane
        )
    polarity, class_columns = _point_polarity(features, n)
    _, names = _column(features, class_columns, n)
    pmap = plane_map(
        pts.shape[1],
        spatial,
        layer_transform=layer_transform,
        image_transform=image_transform,
        slice_point=slice_point,
        slice_indices=slice_indices,
    )
    img = pmap.to_image(pts)
    off = pmap.off_plane(img)
    regions, skipped = [], []
    for i in range(n):
        who = _who("point", i, name)
        if off[i]:
            skipped.append(Skipped(i, "other_slice", f"{who} lies on another slice"))
            continue
        if not np.all(np.isfinite(img[i])):
            skipped.append(Skipped(i, "invalid", f"{who} has non-finite coordinates"))
            continue
        y, x = img[i, -2:]
        pix = np.floor(np.array([y, x]) + 0.5)
        if not (0 <= pix[0] < plane[0] and 0 <= pix[1] < plane[1]):
            skipped.append(Skipped(i, "outside", f"{who} lies outside the image ({_size(plane)})"))
            continue
        label = _class_name(names[i]) if names is not None else None
        regions.append(
            Region.point(
                y,
                x,
                positive=polarity[i],
                span=span,
                label=label,
                source=name,
                index=i,
                image_shape=plane,
            )
        )
    return RegionResult(tuple(regions), tuple(skipped), plane)


def _shape_corners(verts: np.ndarray, kind: str) -> np.ndarray:
    """napari's 2-vertex rectangle (corners) and ellipse (centre, radii) forms -> 4 corners."""
    if verts.shape[0] != 2 or kind not in ("rectangle", "ellipse"):
        return verts
    a, b = verts
    if kind == "ellipse":
        a, b = a - b, a + b
    corners = np.repeat(a[None], 4, axis=0)
    corners[[1, 2], -2] = b[-2]
    corners[[2, 3], -1] = b[-1]
    return corners


def _shape_region(kind: str, v: np.ndarray, **info: Any) -> Region:
    """A shape's vertices in image plane pixels -> Region (box, polygon or path)."""
    if kind == "rectangle":
        if v.shape[0] != 4:
            raise RegionError(f"a rectangle needs 4 corner vertices, got {v.shape[0]}")
        edges = np.abs(np.diff(np.vstack([v, v[:1]]), axis=0))
        tol = 1e-6 * max(1.0, float(np.abs(v).max()))
        if np.all(edges.min(axis=1) <= tol):  # axis-aligned after the transform: stays a box
            return Region.box(*v.min(axis=0), *v.max(axis=0), **info)
        return Region.polygon(v, **info)
    if kind == "ellipse":
        if v.shape[0] != 4:
            raise RegionError(f"an ellipse needs its 4 bounding-box corners, got {v.shape[0]}")
        centre = v.mean(axis=0)
        # half-axes of the ellipse inscribed in the (possibly sheared) box
        u, w = (v[1] + v[2]) / 2 - centre, (v[0] + v[1]) / 2 - centre
        n = int(np.clip(np.ceil(2 * np.pi * max(np.linalg.norm(u), np.linalg.norm(w))), 16, 4096))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        grow = 1 / np.cos(np.pi / n)  # circumscribed: the polygon holds the ellipse, rim included
        return Region.polygon(
            centre + grow * (np.cos(t)[:, None] * u + np.sin(t)[:, None] * w), **info
        )
    if kind == "polygon":
        return Region.polygon(v, **info)
    return Region.path(v, **info)  # path, line


def regions_from_shapes(
    data: Any,
    shape_type: str | Sequence[str] = "rectangle",
    features: Any = None,
    *,
    image_shape: Sequence[int],
    layer_transform: Any = None,
    image_transform: Any = None,
    slice_point: Sequence[float] | None = None,
    slice_indices: Sequence[int] | None = None,
    rgb: bool = False,
    name: str | None = None,
) -> RegionResult:
    """Shapes layer data (list of (V, D) vertex arrays) -> regions on the current plane.

    Rectangles stay boxes while the transform keeps them axis-aligned, else become polygons;
    ellipses become densely sampled circumscribed polygons (about 1/(8 r) px outside the rim); paths
    and lines become 3-px strokes. Class names come from the first of CLASS_COLUMNS found in
    ``features``. A shape is on the current plane when all its vertices are within half a pixel of
    it on every non-displayed axis; shapes of a layer with fewer axes than the image apply to any.
    Shapes read from annotation files come back as one region per annotation: ``hole_of`` rows are
    cut out of their polygon and ``feature_index`` parts merged (see `annotations`).
    """
    spatial = _plane_shape(image_shape, rgb)
    plane = spatial[-2:]
    shapes = (
        [np.asarray(data, dtype=float)]
        if isinstance(data, np.ndarray) and data.ndim == 2
        else list(data)
    )
    shapes = [np.asarray(s, dtype=float) for s in shapes]
    n = len(shapes)
    if n == 0:
        return RegionResult(
            (), (Skipped(None, "empty", f"{_who('shapes layer', None, name)} is empty"),), plane
        )
    ndims = {s.shape[1] for s in shapes if s.ndim == 2}
    if any(s.ndim != 2 or s.shape[0] == 0 for s in shapes) or len(ndims) != 1 or min(ndims) < 2:
        raise RegionError(
            "shapes data must be a list of (V, D) vertex arrays with one D >= 2 for all shapes"
        )
    types = [shape_type] * n if isinstance(shape_type, str) else list(shape_type)
    if len(types) != n:
        raise RegionError(f"got {len(types)} shape types for {n} shapes; they must match")
    _, names = _column(features, CLASS_COLUMNS, n)
    pmap = plane_map(
        ndims.pop(),
        spatial,
        layer_transform=layer_transform,
        image_transform=image_transform,
        slice_point=slice_point,
        slice_indices=slice_indices,
    )
    kinds = [_SHAPE_TYPES.get(str(t).strip().lower()) for t in types]
    shapes = [_shape_corners(s, k) for s, k in zip(shapes, kinds, strict=True)]
    bounds = np.cumsum([0] + [s.shape[0] for s in shapes])
    img = pmap.to_image(np.concatenate(shapes))  # one transform for all vertices
    off = pmap.off_plane(img)
    regions, skipped = [], []
    for i, kind in enumerate(kinds):
        who = _who("shape", i, name, kind)
        v, off_i = img[bounds[i] : bounds[i + 1]], off[bounds[i] : bounds[i + 1]]
        if kind is None:
            skipped.append(Skipped(i, "unsupported", f"{who} has unsupported type {types[i]!r}"))
        elif off_i.any() and pmap.crosses_plane(v):
            msg = f"{who} spans several slices; only shapes drawn in one plane are used"
            skipped.append(Skipped(i, "invalid", msg))
        elif off_i.any():
            skipped.append(Skipped(i, "other_slice", f"{who} lies on another slice"))
        else:
            label = _class_name(names[i]) if names is not None else None
            try:
                region = _shape_region(
                    kind, v[:, -2:], label=label, source=name, index=i, image_shape=plane
                )
            except RegionError as err:
                skipped.append(Skipped(i, "invalid", f"{who}: {err}"))
                continue
            kept = _check(region, who, i, skipped)
            if kept is not None:
                regions.append(kept)
    result = RegionResult(tuple(regions), tuple(skipped), plane)
    return merge_annotations(result, *annotation_columns(features, n))


def _labels_plane(data: np.ndarray, pmap, plane: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour sample of the labels at each pixel of the current plane (0 outside)."""
    a, b = pmap.plane_to_layer()  # layer coords = a @ (row, col) + b, shape (Dl, 2), (Dl,)
    out = np.zeros(plane, dtype=data.dtype)
    rows, cols = np.arange(plane[0], dtype=float), np.arange(plane[1], dtype=float)
    size = np.array(data.shape)
    if np.allclose(a[:-2], 0) and np.allclose([a[-2, 1], a[-1, 0]], 0):
        # axis-aligned: one index vector per axis, and read only the window they touch
        lead = np.floor(b[:-2] + 0.5).astype(np.int64)
        if np.any(lead < 0) or np.any(lead >= size[:-2]):
            return out
        ri = np.floor(a[-2, 0] * rows + b[-2] + 0.5).astype(np.int64)
        ci = np.floor(a[-1, 1] * cols + b[-1] + 0.5).astype(np.int64)
        rok, cok = (ri >= 0) & (ri < size[-2]), (ci >= 0) & (ci < size[-1])
        if not rok.any() or not cok.any():
            return out
        ri, ci = ri[rok], ci[cok]
        window = (
            *[int(i) for i in lead],
            slice(ri.min(), ri.max() + 1),
            slice(ci.min(), ci.max() + 1),
        )
        sub = np.asarray(data[window])  # basic slicing: fine for dask / zarr arrays too
        out[np.ix_(rok, cok)] = sub[np.ix_(ri - ri.min(), ci - ci.min())]
        return out
    # general affine: read the window the plane's corners span, then gather in chunks of rows
    corners = np.array([[0, 0], [0, plane[1] - 1], [plane[0] - 1, 0], [plane[0] - 1, plane[1] - 1]])
    reach = np.floor(corners @ a.T + b + 0.5).astype(np.int64)
    lo, hi = np.maximum(reach.min(axis=0), 0), np.minimum(reach.max(axis=0), size - 1)
    if np.any(lo > hi):
        return out
    sub = np.asarray(data[tuple(slice(int(i), int(j) + 1) for i, j in zip(lo, hi, strict=True))])
    step = max(1, 2_000_000 // max(plane[1], 1))
    for r_start in range(0, plane[0], step):
        r = rows[r_start : r_start + step, None]
        ok = np.ones((r.shape[0], plane[1]), dtype=bool)
        index = []
        for d in range(size.size):  # per layer axis, by broadcasting (no (N, 2) @ (2, 2) products)
            i = np.floor(a[d, 0] * r + a[d, 1] * cols[None, :] + (b[d] + 0.5)).astype(np.int64)
            ok &= (i >= lo[d]) & (i <= hi[d])
            index.append(i - lo[d])
        out[r_start : r_start + step][ok] = sub[tuple(i[ok] for i in index)]
    return out


def regions_from_labels(
    data: Any,
    features: Any = None,
    *,
    image_shape: Sequence[int],
    layer_transform: Any = None,
    image_transform: Any = None,
    slice_point: Sequence[float] | None = None,
    slice_indices: Sequence[int] | None = None,
    rgb: bool = False,
    name: str | None = None,
) -> RegionResult:
    """Labels layer data (int array, nD) -> one mask `Region` per label id on the current plane.

    The labels are resampled (nearest neighbour) onto the image's pixel grid, so a Labels layer with
    another scale or offset than the image still lands right. ``index`` is the label id; class names
    come from ``features`` rows whose ``index`` column (napari's convention) equals the id, else
    from row ``id``.
    """
    spatial = _plane_shape(image_shape, rgb)
    plane = spatial[-2:]
    arr = data if hasattr(data, "shape") and hasattr(data, "dtype") else np.asarray(data)
    if len(arr.shape) < 2 or not (
        np.issubdtype(np.dtype(arr.dtype), np.integer) or arr.dtype == bool
    ):
        raise RegionError(
            f"labels data must be an integer array with >= 2 axes, got {arr.dtype} {arr.shape}"
        )
    pmap = plane_map(
        len(arr.shape),
        spatial,
        layer_transform=layer_transform,
        image_transform=image_transform,
        slice_point=slice_point,
        slice_indices=slice_indices,
    )
    from skimage.measure import regionprops  # lazy: pulls in scipy (~0.5 s) only when needed

    lab = _labels_plane(arr, pmap, plane).astype(np.int64)
    if lab.min(initial=0) < 0:
        lab[lab < 0] = 0
    class_of = _label_classes(features)
    regions = []
    for prop in regionprops(lab):
        r0, c0 = prop.bbox[:2]
        regions.append(
            Region.mask(
                prop.image,
                offset=(r0, c0),
                label=class_of.get(prop.label),
                source=name,
                index=int(prop.label),
                image_shape=plane,
            )
        )
    if regions:
        return RegionResult(tuple(regions), (), plane)
    msg = f"{_who('labels layer', None, name)} has no labels on the current plane of the image"
    return RegionResult((), (Skipped(None, "empty", msg),), plane)


def _label_classes(features: Any) -> dict[int, str]:
    """label id -> class name from a Labels layer's features table (optional)."""
    if features is None:
        return {}
    keys = list(features.columns) if hasattr(features, "columns") else list(features.keys())
    if not keys:
        return {}
    n = len(np.asarray(features[keys[0]], dtype=object).ravel())
    _, names = _column(features, CLASS_COLUMNS, n)
    if names is None:
        return {}
    _, ids = _column(features, ("index",), n)
    ids = np.arange(n) if ids is None else ids
    return {int(i): c for i, v in zip(ids, names, strict=True) if (c := _class_name(v)) is not None}


def regions_from_layer_data(
    layer_data: Sequence[Any],
    *,
    image_shape: Sequence[int],
    image_transform: Any = None,
    slice_point: Sequence[float] | None = None,
    slice_indices: Sequence[int] | None = None,
    rgb: bool = False,
    span: int = POINT_SPAN,
) -> RegionResult:
    """A reader's LayerData ``(data, meta, layer_type)`` -> regions (napari CSV, our readers, ...).

    ``meta`` may carry ``shape_type``, ``features`` or ``properties``, ``name`` and the layer
    transform keys ``scale``, ``translate``, ``rotate``, ``shear``, ``affine``.
    """
    if len(layer_data) != 3 or layer_data[2] not in ("points", "shapes", "labels"):
        got = layer_data[2] if len(layer_data) == 3 else f"a {len(layer_data)}-tuple"
        raise RegionError(
            f"expected (data, meta, 'points'|'shapes'|'labels') layer data, got {got!r}"
        )
    data, meta, layer_type = layer_data
    meta = dict(meta or {})
    features = meta.get("features", meta.get("properties"))
    transform = {
        k: meta[k]
        for k in ("scale", "translate", "rotate", "shear", "affine")
        if meta.get(k) is not None
    }
    common = {
        "image_shape": image_shape,
        "layer_transform": transform or None,
        "image_transform": image_transform,
        "slice_point": slice_point,
        "slice_indices": slice_indices,
        "rgb": rgb,
        "name": meta.get("name"),
    }
    if layer_type == "points":
        return regions_from_points(data, features, span=span, **common)
    if layer_type == "shapes":
        return regions_from_shapes(data, meta.get("shape_type", "rectangle"), features, **common)
    return regions_from_labels(data, features, **common)
