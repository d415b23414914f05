"""Regions: napari Points / Shapes / Labels geometry -> `Region`s in image pixels (napari-free).

Public API (numpy + scikit-image only; never imports napari, Qt or torch)::

    Region.point(y, x, *, positive=True, span=20, label=None, source=None, index=None,
                 image_shape=None)
    Region.box(y0, x0, y1, x1, **info)          # inclusive: pixel centres in [y0, y1] x [x0, x1]
    Region.polygon(vertices, **info)            # (N, 2) (row, col), either orientation
    Region.path(vertices, **info)               # open polyline, 3 px wide
    Region.mask(bool_array, *, offset=(0, 0), **info)
    region.kind                                 # "point" | "box" | "polygon" | "path" | "mask"
    region.to_mask(shape=None) -> bool ndarray  # at image resolution, clipped
    region.crop(shape=None) -> (bool crop, (row0, col0))       # the cheap form of to_mask
    region.bbox -> (y0, x0, y1, x1) | None      # inclusive pixel box of the clipped mask
    region.points, region.point_labels          # (1, 2) and (1,) for point prompts, else None
    region.area, region.describe(), region.with_image_shape(shape)
    region.label, .positive, .source, .index, .image_shape, .coords, .span

    regions_from_points(data, features=None, *, image_shape, layer_transform=None,
                        image_transform=None, slice_point=None, slice_indices=None, rgb=False,
                        span=20, name=None) -> RegionResult
    regions_from_shapes(data, shape_type="rectangle", features=None, *, image_shape, ...,
                        name=None) -> RegionResult                # same keywords, no span
    regions_from_labels(data, features=None, *, image_shape, ..., name=None) -> RegionResult
    regions_from_layer_data((data, meta, layer_type), *, image_shape, image_transform=None,
                            slice_point=None, slice_indices=None, rgb=False, span=20)
    RegionResult: .regions, .skipped (Skipped(index, reason, message)), .image_shape, .problems,
                  .summary(), .raise_if_empty(), .masks(), .to_labels(); len, iter, [i], a + b
    RegionError(ValueError)                     # one-line message; .skipped
    world_matrix(scale=None, translate=None, rotate=None, shear=None, affine=None, *, ndim=None)

Conventions:

* Coordinates are napari's (row, col) in image data pixels, origin top-left, pixel centres at
  integers.
* ``layer_transform`` and ``image_transform`` map each layer's data to world coordinates as napari
  does (``affine @ (rotate @ shear @ scale + translate)``). Give None, an (n+1, n+1) matrix, a
  napari ``Affine``-like object or a dict of `world_matrix` keywords. The UI adapter passes
  ``world_matrix(scale=l.scale, translate=l.translate, rotate=l.rotate, shear=l.shear,
  affine=l.affine.affine_matrix)``.
* ``image_shape`` is the image layer's data shape; with ``rgb=True`` its last (channel) axis is
  dropped. The displayed plane is the last two spatial axes. For nD data give the current slice as
  ``slice_point=viewer.dims.point`` (world) or ``slice_indices`` (image indices of the
  non-displayed axes). Items off the current plane by more than half an image pixel are skipped
  (reason ``"other_slice"``); layers with fewer axes than the image are aligned on trailing axes
  and apply to every slice.
* Converters do not raise for single bad items: those become ``skipped`` entries with a readable
  message (outside the image, empty, other slice, invalid, unsupported type). `RegionError` is
  raised for malformed input and by ``RegionResult.raise_if_empty()``. Regions are clipped to the
  image plane.
"""

from .annotations import merge_annotations
from .layers import (
    regions_from_labels,
    regions_from_layer_data,
    regions_from_points,
    regions_from_shapes,
)
from .region import PATH_RADIUS, POINT_SPAN, Region, RegionError
from .result import RegionResult, Skipped
from .transforms import world_matrix

__all__ = [
    "PATH_RADIUS",
    "POINT_SPAN",
    "Region",
    "RegionError",
    "RegionResult",
    "Skipped",
    "merge_annotations",
    "regions_from_labels",
    "regions_from_layer_data",
    "regions_from_points",
    "regions_from_shapes",
    "world_matrix",
]
