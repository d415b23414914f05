"""napari layers -> what the engine takes: the image plane on screen, regions with colours.

The only place that reads napari layer *objects* for the model: it turns an Image layer plus the
viewer's current position into an `ImagePlane` (level 0 of multiscale data, RGB kept, the slice of
nD data that is shown) and Points / Shapes / Labels layers into `Region`s via
`napari_medplib.regions`, with napari's data -> world transforms rebuilt by `regions.world_matrix`.
Shapes read from files may carry ``hole_of`` (a hole cut from another shape) and ``feature_index``
(parts of one annotation); those become one mask region per annotation here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..imaging import ImageInputError
from ..regions import (
    Region,
    RegionError,
    RegionResult,
    regions_from_labels,
    regions_from_points,
    regions_from_shapes,
    world_matrix,
)
from ..regions.transforms import plane_map

REGION_LAYER_TYPES = ("points", "shapes", "labels")
#: ``layer.metadata`` key of the prompt layers the widget makes ('+ Points', '+ Box / Shapes' of
#: `pickers`): Commit clears the prompts it used from these (never from the user's own layers).
PROMPT_LAYER = "medplib_prompts"
#: Face colours of positive and negative point prompts (the Points layer's ``positive`` feature).
POINT_COLOURS = {True: "#33dd55", False: "#ff3366"}
#: Largest plane (pixels) read from a multiscale image; larger level-0 planes use a coarser level.
MAX_PLANE_PIXELS = 32_000_000


def layer_kind(layer: Any) -> str:
    """napari's lower-case layer type name ("image", "points", ...) from the public class name.

    ``__class__``, not ``type()``: plugins get layers wrapped in napari's PublicOnlyProxy.
    """
    return layer.__class__.__name__.lower()


def layer_key(layer: Any) -> Any:
    """A stable identity for a layer, also through napari's proxies (``unique_id``)."""
    return getattr(layer, "unique_id", None) or id(layer)


def layer_transform(layer: Any, factors: Any = None) -> np.ndarray:
    """The layer's data -> world matrix, as napari composes it.

    ``factors`` are a multiscale level's downsample factors: napari maps level pixels to level-0
    pixels by scaling alone, so the level's transform is the layer's with scale times factors.
    """
    scale = np.asarray(layer.scale, dtype=float)
    if factors is not None:
        scale = scale * np.asarray(factors, dtype=float)[-scale.size :]
    return world_matrix(
        scale=scale,
        translate=layer.translate,
        rotate=layer.rotate,
        shear=layer.shear,
        affine=layer.affine.affine_matrix,
    )


@dataclass(frozen=True)
class ImagePlane:
    """One 2-D plane of an image layer, ready to be read in a worker thread.

    ``index`` holds the image indices of the non-displayed spatial axes (empty for 2-D data); the
    plane is ``data[index]``, (H, W) or (H, W, C) for RGB. ``scale`` is the world size of one
    pixel of ``data`` (the layer's scale, times the downsample factors of a multiscale level).
    """

    name: str
    data: Any  # one level's array (numpy, dask, zarr ...); read lazily by `read`
    spatial_shape: tuple[int, ...]
    rgb: bool
    index: tuple[int, ...]
    transform: np.ndarray
    contrast_limits: tuple[float, float] | None
    scale: tuple[float, ...] = ()
    level: int = 0

    @property
    def plane_shape(self) -> tuple[int, int]:
        return (int(self.spatial_shape[-2]), int(self.spatial_shape[-1]))

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    def read(self) -> np.ndarray:
        """The plane as a numpy array (computes dask/zarr slices: call it off the Qt thread)."""
        return np.asarray(self.data[self.index])

    def with_index(self, index: Sequence[int]) -> ImagePlane:
        return replace(self, index=tuple(int(i) for i in index))


def _check_displayed(dims: Any, world_ndim: int) -> None:
    if dims is None:
        return
    if int(dims.ndisplay) != 2:
        raise ImageInputError(
            "the viewer shows 3-D; switch to 2-D (the 2D/3D button) to ask about the shown plane"
        )
    displayed = tuple(int(d) for d in dims.displayed)
    if displayed != (world_ndim - 2, world_ndim - 1):
        raise ImageInputError(
            "the viewer shows a transposed plane; restore the axis order (right-click the "
            "transpose button) so the last two axes are on screen"
        )


def _level(layer: Any, max_pixels: int) -> int:
    """The finest multiscale level whose plane has at most ``max_pixels`` (else the coarsest)."""
    rgb = bool(layer.rgb)
    for i, array in enumerate(layer.data):
        shape = array.shape[:-1] if rgb else array.shape
        if int(shape[-2]) * int(shape[-1]) <= max_pixels:
            return i
    return len(layer.data) - 1


def image_plane(layer: Any, dims: Any = None, *, max_pixels: int | None = None) -> ImagePlane:
    """The plane of an Image layer shown at the viewer's current position (``viewer.dims``).

    Multiscale data is read at full resolution (level 0) unless its plane has more than
    ``max_pixels`` (default `MAX_PLANE_PIXELS`); then at the finest level that fits, and masks
    come out at that level's resolution (with its scale). With ``dims=None`` the first plane of
    nD data is used.
    """
    if layer is None or layer_kind(layer) != "image":
        raise ImageInputError("pick an image layer first (the 'image' list at the top)")
    limit = MAX_PLANE_PIXELS if max_pixels is None else int(max_pixels)
    level = _level(layer, limit) if layer.multiscale else 0
    data = layer.data[level] if layer.multiscale else layer.data
    rgb = bool(layer.rgb)
    spatial = tuple(int(s) for s in (data.shape[:-1] if rgb else data.shape))
    if len(spatial) < 2:
        raise ImageInputError(f"image layer {layer.name!r} has fewer than 2 spatial axes")
    factors = np.asarray(layer.downsample_factors[level]) if layer.multiscale else None
    transform = layer_transform(layer, factors)
    scale = np.asarray(layer.scale, dtype=float)
    if factors is not None:
        scale = scale * factors[-scale.size :]
    index: tuple[int, ...] = ()
    if len(spatial) > 2:
        if dims is None:
            index = (0,) * (len(spatial) - 2)
        else:
            _check_displayed(dims, len(dims.point))
            current = plane_map(
                len(spatial),
                spatial,
                layer_transform=transform,
                image_transform=transform,
                slice_point=dims.point,
            ).current
            index = tuple(int(i) for i in current[len(current) - (len(spatial) - 2) :])
    elif dims is not None:
        _check_displayed(dims, len(dims.point))
    limits = None
    if not (rgb and np.dtype(data.dtype) == np.uint8):
        limits = tuple(float(v) for v in layer.contrast_limits)
    return ImagePlane(
        layer.name, data, spatial, rgb, index, transform, limits, tuple(scale.tolist()), level
    )


# ---- regions -------------------------------------------------------------------------------------
def _selected(layer: Any) -> set[int]:
    return {int(i) for i in getattr(layer, "selected_data", ()) or ()}


def layer_regions(
    layer: Any,
    plane: ImagePlane,
    dims: Any = None,
    *,
    only_selected: bool = True,
) -> RegionResult:
    """Regions of one Points / Shapes / Labels layer on ``plane``.

    With ``only_selected`` and a non-empty selection in a Points or Shapes layer, only the
    selected items are used (so "What is in the selected region?" means what it says).
    """
    kind = layer_kind(layer)
    common = {
        "image_shape": plane.spatial_shape,
        "layer_transform": layer_transform(layer),
        "image_transform": plane.transform,
        "name": layer.name,
    }
    if dims is not None and plane.ndim > 2:
        common["slice_point"] = dims.point
    elif plane.ndim > 2:
        common["slice_indices"] = plane.index
    if kind == "points":
        result = regions_from_points(layer.data, layer.features, **common)
    elif kind == "shapes":
        result = regions_from_shapes(layer.data, layer.shape_type, layer.features, **common)
    elif kind == "labels":
        data = layer.data[0] if layer.multiscale else layer.data
        result = regions_from_labels(data, layer.features, **common)
    else:
        raise RegionError(f"layer {layer.name!r} is a {kind} layer; pick Points, Shapes or Labels")
    chosen = _selected(layer) if only_selected and kind in ("points", "shapes") else set()
    if chosen:
        kept = tuple(r for r in result.regions if r.index in chosen)
        result = RegionResult(kept, result.skipped, result.image_shape)
    return result


def _hex(rgba: Any) -> str:
    rgb = np.clip(np.asarray(rgba, dtype=float).ravel()[:3], 0, 1)
    return "#" + "".join(f"{round(v * 255):02x}" for v in rgb)


def region_colour(layer: Any, region: Region) -> str:
    """The colour the user sees for a region: shape edge (else face), point face, label colour."""
    kind, i = layer_kind(layer), region.index
    try:
        if kind == "shapes":
            edge = np.asarray(layer.edge_color)[i]
            face = np.asarray(layer.face_color)[i]
            return _hex(edge if edge[3] > 0 else face)
        if kind == "points":
            return _hex(np.asarray(layer.face_color)[i])
        if kind == "labels":
            return _hex(layer.get_color(i))
    except (IndexError, TypeError, ValueError):
        pass
    return "#ffaa00"


@dataclass(frozen=True)
class RegionSet:
    """Regions of several layers, in order, with one display colour each."""

    result: RegionResult
    colours: tuple[str, ...]

    @property
    def regions(self) -> tuple[Region, ...]:
        return self.result.regions

    def __len__(self) -> int:
        return len(self.result.regions)


def collect_regions(
    layers: Sequence[Any],
    plane: ImagePlane,
    dims: Any = None,
    *,
    only_selected: bool = True,
    positive_only: bool = False,
) -> RegionSet:
    """Regions of all ``layers`` on ``plane`` (empty layers just add a skipped note).

    ``positive_only`` drops negative point prompts: they mark background for direct
    segmentation and are no region to ask about.
    """
    result = RegionResult((), (), plane.plane_shape)
    colours: list[str] = []
    for layer in layers:
        part = layer_regions(layer, plane, dims, only_selected=only_selected)
        if positive_only:
            kept = tuple(r for r in part.regions if r.kind != "point" or r.positive)
            part = RegionResult(kept, part.skipped, part.image_shape)
        result = result + part
        colours += [region_colour(layer, r) for r in part.regions]
    return RegionSet(result, tuple(colours))


def region_tags(question: str) -> int:
    """How many regions a question names: bare ``<region>`` tags, or the largest ``<regionN>``."""
    bare = len(re.findall(r"<region>", question))
    numbered = [int(n) for n in re.findall(r"<region(\d+)>", question)]
    return max(bare, max(numbered, default=0))


def fit_to_question(regions: RegionSet, question: str) -> tuple[RegionSet, str]:
    """Keep as many regions as the question names: the most recently drawn ones.

    Returns the regions and a note for the transcript when some were left out ('' otherwise).
    Selecting shapes first (see `layer_regions`) is how a user picks other ones.
    """
    wanted, have = region_tags(question), len(regions)
    if wanted == 0 or have <= wanted:
        return regions, ""
    kept = RegionResult(
        regions.result.regions[-wanted:], regions.result.skipped, regions.result.image_shape
    )
    note = (
        f"{have} regions on this plane, the question names {wanted}: using the last drawn "
        f"{'one' if wanted == 1 else wanted}; select shapes to choose others"
    )
    return RegionSet(kept, regions.colours[-wanted:]), note


# ---- the active layer ------------------------------------------------------------------------------
class KeepActive:
    """Context manager: layers added inside it do not take the active layer (and its mode) away.

    napari makes every new layer the active one, in pan/zoom; a preview or output layer made by
    Segment or an answer would then swallow the user's next click. On exit the layer that was
    active is made active again, in the mode it was in.
    """

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.layer: Any = None
        self.mode: str | None = None

    def __enter__(self) -> KeepActive:
        self.layer = self.viewer.layers.selection.active
        self.mode = getattr(self.layer, "mode", None)
        return self

    def __exit__(self, *exc: object) -> None:
        layer = self.layer
        if layer is None or layer not in self.viewer.layers:
            return
        if self.viewer.layers.selection.active is not layer:
            self.viewer.layers.selection.active = layer
        if self.mode is not None and str(getattr(layer, "mode", "")) != str(self.mode):
            try:
                layer.mode = self.mode
            except (ValueError, TypeError):  # a mode this layer no longer allows
                pass
