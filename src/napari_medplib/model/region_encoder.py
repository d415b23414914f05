"""One LLM token per region: MedPLIB's ``extract_region_feature`` (the released model's path; the
unused GeoSampler is not implemented).

region_fea_adapter(CLIP patch features) gives a 24x24 grid of D-vectors. The region's 24x24 mask
cells become points (row/24, col/24), which are sampled bilinearly with ``grid_sample(...,
align_corners=True)`` (so cell i is read at grid coordinate i*23/24, as in the reference) and averaged.
Above ``max_sample_point`` cells a random subset is taken, as the reference does.

Our extension (``config.region_geometry``, off for the released checkpoints): the mean of features says
*what* a region holds but little about *where* it is, how large or how elongated, which a small model
trained from scratch did not recover from CLIP's position embeddings (region-VQA "position" and "size"
stayed at chance in our first training run). With it on, an MLP of the region's own cell-grid geometry
(centroid, extent, second moments: `region_geometry`, expanded into sines and cosines by
`geometry_encoding`) is added to the token. Measured on position-only questions: with the sine/cosine
encoding and a non-zero init the LLM starts reading the region after ~250 steps, vs ~650 with raw
features and a zero-initialised output layer.

Region masks may come as the reference's cell grids [R, g, g] or at the CLIP frame's resolution
[R, g*p, g*p] (336 px, `preprocess.region_mask_to_grid`'s ``mask_336``). From a frame-resolution mask
the reference path reads the same cell grid the reference does (the top-left pixel of every p x p
cell), so released checkpoints see identical inputs. With ``region_geometry`` on, the frame-resolution
mask is used as it is: the token is the exact mean of the bilinear samples at every pixel of the region
(`_pixel_mean_weights`), and the geometry is measured on the pixels. On the cell grid a nucleus of
200 px covers 1-3 cells and an H&E nucleus of 40 px often no cell at all (a zero token); a small MLP
probe on held-out region questions read "round or elongated" from the grid geometry at 0.60 (chance
0.5) and from the pixel geometry at 0.81, the 3x3 position at 0.90 and 0.95.

Version 3 of the geometry (`region_inputs`) also reads the region's *object* (a box's object is SAM's
mask of it, made by the caller) and how bright the object is against the frame (`region_photometry`),
for the questions about the object in a box and about brightness (docs/model-card.md).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import MedPLIBConfig


class EmptyRegionWarning(UserWarning):
    """A region covers no cell of the 24x24 grid (too small or too thin after downsampling)."""


#: Number of shape features of one mask for each ``config.region_geometry_version`` (version 3 measures
#: version 2's on two masks and adds `PHOTOMETRY_FEATURES`: see `region_inputs`).
GEOMETRY_FEATURES_BY_VERSION = {1: 10, 2: 12, 3: 12}
#: Number of brightness features of a region's object (``region_geometry_version`` 3, `region_photometry`).
PHOTOMETRY_FEATURES = 8
#: Percentiles of the frame's brightness that `region_photometry` compares the object's mean with.
PHOTOMETRY_PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0)
#: Version 1's count (our checkpoints up to the fourth run; version 2 since the sixth).
GEOMETRY_FEATURES = GEOMETRY_FEATURES_BY_VERSION[1]


def region_geometry(mask: torch.Tensor, version: int = 1) -> torch.Tensor:
    """Shape features of one region's mask [g, g] (a cell grid or the frame's pixels) -> floats of order 1.

    Version 1 (10 features): centroid (row, col) in [0, 1]; sqrt of the covered fraction; bounding-box
    height and width as fractions; 4x the row/col standard deviations and their correlation
    (elongation, orientation); the covered fraction of the bounding box (box vs. blob) and 1 / cells
    covered (a point covers one). Cell i is taken at (i + 0.5) / g. An empty mask gives zeros.

    Version 2 adds two features a from-scratch MLP could not recover from version 1 (measured: region
    VQA "size" 0.50 and "shape" 0.65 on mask regions after the ``regions`` stage): the log of the covered
    fraction, (ln f + 6) / 3 (objects cover 1e-4..1e-1 of the frame, so sqrt f spans only 0.01..0.3 and
    a small-vs-medium threshold moved it by ~0.01), and the eccentricity of the second moments,
    sqrt(1 - minor / major variance), the scale-free "round or elongated" a ratio of two small stds
    hid. Both are standard region properties (skimage ``regionprops``: area, eccentricity).
    """
    count = GEOMETRY_FEATURES_BY_VERSION[version]
    version = min(version, 2)  # version 3 measures version 2's shape features (`region_inputs`)
    rows, cols = mask.shape
    points = mask.nonzero().float()  # [n, 2] (row, col)
    n = points.shape[0]
    if n == 0:
        return torch.zeros(count, device=mask.device)
    scale = torch.tensor([rows, cols], dtype=torch.float32, device=mask.device)
    centres = (points + 0.5) / scale
    mean = centres.mean(dim=0)
    centred = centres - mean
    variance = (centred**2).mean(dim=0) + 1.0 / (12 * scale**2)  # + the spread within one cell
    std = variance.sqrt()
    covariance = (centred[:, 0] * centred[:, 1]).mean()
    corr = covariance / (std[0] * std[1])
    extent = (points.max(dim=0).values - points.min(dim=0).values + 1) / scale
    scalars = torch.tensor(
        [(n / (rows * cols)) ** 0.5, n / float((extent * scale).prod()), 1.0 / n], device=mask.device
    )
    features = [mean, scalars[:1], extent, 4 * std, corr.reshape(1), scalars[1:]]
    if version >= 2:
        half = (((variance[0] - variance[1]) / 2) ** 2 + covariance**2).sqrt()
        major, minor = variance.mean() + half, variance.mean() - half
        eccentricity = (1 - minor / major).clamp(0, 1).sqrt()
        log_fraction = (torch.log(torch.tensor(n / (rows * cols), device=mask.device)) + 6) / 3
        features += [log_fraction.reshape(1), eccentricity.reshape(1)]
    return torch.cat(features)


#: Frequencies (times pi) of the sine/cosine expansion of the geometry features.
GEOMETRY_FREQUENCIES = (1.0, 2.0, 4.0)


def geometry_encoding_width(features: int = GEOMETRY_FEATURES) -> int:
    """Width of `geometry_encoding`'s output: the raw features plus a sine and a cosine per frequency."""
    return features * (1 + 2 * len(GEOMETRY_FREQUENCIES))


#: Version 1's encoding width.
GEOMETRY_ENCODING = geometry_encoding_width()


def region_input_width(version: int) -> int:
    """Width of `region_inputs` for a ``region_geometry_version``: one encoded block per measured part."""
    width = geometry_encoding_width(GEOMETRY_FEATURES_BY_VERSION[version])
    if version >= 3:  # + the object's shape and its brightness
        width += geometry_encoding_width(GEOMETRY_FEATURES_BY_VERSION[version])
        width += geometry_encoding_width(PHOTOMETRY_FEATURES)
    return width


def region_photometry(object_mask: torch.Tensor, brightness: torch.Tensor,
                      levels: torch.Tensor | None = None) -> torch.Tensor:
    """How bright a region's object is, against the whole frame -> [PHOTOMETRY_FEATURES] floats of order 1.

    ``brightness`` [S, S]: the CLIP frame's grey level in [0, 1] (the mean of the 8-bit RGB the model sees,
    NaN in the padding, `preprocess.frame_brightness`). Features: the object's mean and std, the fraction
    of frame pixels darker than its mean, and 2x its mean minus each of `PHOTOMETRY_PERCENTILES` of the
    frame (``levels``: `frame_levels` of ``brightness``, when the caller has them). An empty mask gives
    zeros. Why: "is the nucleus in <region> dim or bright?" compares an object with the others of its
    kind; the from-scratch CLIP tower's layer norms keep little of absolute grey levels, and a probe on
    held-out questions answered it at 0.97 from these features and the category (0.81 from the mean
    and rank alone).
    """
    levels = frame_levels(brightness) if levels is None else levels
    values = brightness[object_mask.bool() & ~brightness.isnan()]
    if values.numel() == 0 or levels.numel() == 0:
        return torch.zeros(PHOTOMETRY_FEATURES, device=brightness.device)
    mean = values.mean()
    # linear interpolation between order statistics, as torch.quantile; the rank as (levels < mean).mean()
    position = torch.tensor(PHOTOMETRY_PERCENTILES, dtype=torch.float64, device=levels.device) / 100 * (levels.numel() - 1)
    low, high = position.floor().long(), position.ceil().long()
    quantiles = (levels[low] + (levels[high] - levels[low]) * (position - low).to(levels.dtype))
    rank = torch.searchsorted(levels, mean.reshape(1)).float()[0] / levels.numel()
    return torch.cat([torch.stack([mean, values.std(unbiased=False), rank]), 2 * (mean - quantiles)]).float()


def frame_levels(brightness: torch.Tensor) -> torch.Tensor:
    """The frame's grey levels outside the padding, sorted: computed once per image, read by every region's
    `region_photometry` (percentiles and ranks are then lookups, not a sort per region)."""
    return brightness[~brightness.isnan()].float().sort().values


def region_inputs(mask: torch.Tensor, version: int, object_mask: torch.Tensor | None = None,
                  brightness: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> torch.Tensor:
    """The geometry MLP's input for one region: `geometry_encoding` of its shape features, and in version 3
    also of its object's shape and brightness (each block encoded on its own, so a version-2 MLP widened
    with zero columns computes what it did: `widen_geometry_weight`).

    ``object_mask``: the object the region stands for, on the same frame (a box's object is SAM's mask of
    it; None: the region itself, as for a mask or a clicked object). Why: a box's own shape says how large
    and elongated the *box* is; "how big is the object in <region>?" asks about the object (a probe
    answered size from the box's area at 0.35-0.48 on held-out questions, from SAM's mask of it at 0.88-0.95).
    """
    blocks = [geometry_encoding(region_geometry(mask, version))]
    if version >= 3:
        if brightness is None:
            raise ValueError("region_geometry_version 3 reads the frame's brightness: pass brightness "
                             "(ImageFeatures.brightness, from preprocess.frame_brightness)")
        target = mask if object_mask is None or not object_mask.any() else object_mask.bool()
        blocks.append(geometry_encoding(region_geometry(target, version)))
        blocks.append(geometry_encoding(region_photometry(target, brightness.to(mask.device), levels)))
    return torch.cat(blocks)


def widen_geometry_weight(weight: torch.Tensor, width: int) -> torch.Tensor:
    """A geometry MLP's first weight [D, w] for a narrower input (an earlier version) -> [D, width]: the old
    columns first, zeros for the new inputs, so the model computes what it did until they train."""
    if weight.ndim != 2 or weight.shape[1] > width:
        raise ValueError(f"cannot widen a geometry weight of shape {tuple(weight.shape)} to {width} inputs")
    return torch.cat([weight, weight.new_zeros(weight.shape[0], width - weight.shape[1])], dim=1)


def geometry_encoding(raw: torch.Tensor) -> torch.Tensor:
    """[..., F] geometry features -> [..., 7F]: the features, then sin and cos of pi*f*feature.

    Features of order 1 that change little between nearby regions (a centroid moves by 1/24 per cell)
    give an MLP almost the same input everywhere; the sines and cosines spread them out."""
    freqs = torch.tensor(GEOMETRY_FREQUENCIES, dtype=raw.dtype, device=raw.device)
    angles = torch.pi * raw[..., None] * freqs  # [..., F, n_freq]
    return torch.cat([raw, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


def _pixel_mean_weights(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """[S, S] frame-resolution mask -> [g, g] weights whose dot product with a g x g feature map is the
    mean of its bilinear samples at every mask pixel.

    Pixel i is read at grid coordinate (i / S) * (g - 1), the reference's convention for cells (cell c =
    pixel c * S / g is read at c * (g - 1) / g). Bilinear sampling is separable, so the sum over pixels is
    W_rows^T mask W_cols with W[i, c] = max(0, 1 - |coordinate(i) - c|): exact, deterministic, and cheap
    (no subset of pixels is drawn)."""
    side = mask.shape[-1]
    coords = torch.arange(side, dtype=torch.float32, device=mask.device) * ((grid - 1) / side)  # [S]
    cells = torch.arange(grid, dtype=torch.float32, device=mask.device)
    interp = (1 - (coords[:, None] - cells[None, :]).abs()).clamp(min=0)  # [S, g]
    m = mask.float()
    return interp.T @ m @ interp / m.sum()


class RegionEncoder(nn.Module):
    """(patch features [P, Dv], masks [R, g, g] or [R, S, S]) -> (region tokens [R, D], empty [R] bool)."""

    def __init__(self, config: MedPLIBConfig) -> None:
        super().__init__()
        self.adapter = nn.Linear(config.mm_hidden_size, config.hidden_size)
        self.geometry: nn.Sequential | None = None
        if config.region_geometry:
            if config.region_geometry_version not in GEOMETRY_FEATURES_BY_VERSION:
                raise ValueError(
                    f"region_geometry_version must be one of {sorted(GEOMETRY_FEATURES_BY_VERSION)}, "
                    f"got {config.region_geometry_version}"
                )
            width = region_input_width(config.region_geometry_version)
            self.geometry = nn.Sequential(
                nn.Linear(width, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
            )
            # a signal the LLM can see from step 0 (its size matters: docs/model-card.md, Findings)
            nn.init.normal_(self.geometry[2].weight, std=config.region_geometry_init_std)
        self.geometry_version = config.region_geometry_version
        self.max_sample_point = config.max_sample_point
        #: "warn" (default): an empty region gives a zero vector and an ``EmptyRegionWarning``;
        #: "error": ValueError; "zero": silently a zero vector (the reference's behaviour).
        self.on_empty = "warn"

    def forward(
        self, patch_features: torch.Tensor, region_masks: torch.Tensor, generator: torch.Generator | None = None,
        object_masks: torch.Tensor | None = None, brightness: torch.Tensor | None = None,
        levels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``region_masks``: [R, g, g] cell grids or [R, g*p, g*p] frame-resolution masks (see the module
        docstring). ``generator``: RNG for the >max_sample_point subset (None = torch's global RNG, as the
        reference). Version-3 geometry only: ``object_masks`` [R, g*p, g*p] (the object each region stands
        for; an empty one, or None, means the region itself), ``brightness`` [g*p, g*p] (`region_inputs`) and
        its sorted ``levels`` (`frame_levels`; computed here when not given)."""
        grid = round(patch_features.shape[0] ** 0.5)
        side = region_masks.shape[-1]
        if region_masks.ndim != 3 or region_masks.shape[-2] != side or grid * grid != patch_features.shape[0] or side % grid:
            raise ValueError(
                f"region masks must be [R, {grid}, {grid}] cell grids or [R, {grid}*p, {grid}*p] masks on the "
                f"CLIP frame, got {tuple(region_masks.shape)}"
            )
        adapted = self.adapter(patch_features.to(self.adapter.weight.dtype))  # [P, D]
        feature_map = adapted.float().T.reshape(1, -1, grid, grid)  # [1, D, g, g]
        pixels = self.reads_pixels and side > grid  # our extension: read the region's own pixels
        if not pixels and side > grid:
            step = side // grid
            region_masks = region_masks[:, ::step, ::step]  # the reference's cell grid (top-left pixels)
        tokens, empty = [], []
        if self.geometry is not None and self.geometry_version >= 3 and brightness is not None:
            brightness = brightness.to(region_masks.device)
            levels = frame_levels(brightness) if levels is None else levels.to(region_masks.device)  # once per image
        for index, mask in enumerate(region_masks):
            mask = mask.bool()
            if not mask.any():
                empty.append(True)
                tokens.append(torch.zeros(adapted.shape[-1], dtype=adapted.dtype, device=adapted.device))
                self._report_empty(index, pixels)
                continue
            if pixels:
                weights = _pixel_mean_weights(mask, grid)  # [g, g], sums to 1
                token = (feature_map[0] * weights).sum(dim=(-2, -1))
            else:
                token = self._sample_cells(feature_map, mask, generator)
            if self.geometry is not None:
                target = object_masks[index] if object_masks is not None else None
                geometry = region_inputs(mask, self.geometry_version, target, brightness, levels).to(self.geometry[0].weight.dtype)
                token = token + self.geometry(geometry).float()
            tokens.append(token.to(adapted.dtype))
            empty.append(False)
        return torch.stack(tokens), torch.tensor(empty, dtype=torch.bool)

    def _sample_cells(self, feature_map: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The reference: bilinear samples at the covered cells (row/g, col/g), averaged -> [D]."""
        points = mask.nonzero().float()  # [n, 2] (row, col)
        if points.shape[0] > self.max_sample_point:
            keep = torch.randperm(points.shape[0], generator=generator)[: self.max_sample_point]
            points = points[keep.to(points.device)]
        points = points / torch.tensor([mask.shape[0], mask.shape[1]], dtype=torch.float32, device=points.device)
        sample_grid = (2 * points.flip(-1) - 1)[None, None]  # [1, 1, n, 2] as (x, y)
        sampled = F.grid_sample(feature_map, sample_grid, mode="bilinear", align_corners=True)  # [1, D, 1, n]
        return sampled[0, :, 0].mean(dim=-1)

    @property
    def reads_pixels(self) -> bool:
        """Whether frame-resolution masks are read pixel by pixel (else through the reference's cell grid)."""
        return self.geometry is not None

    def _report_empty(self, index: int, pixels: bool) -> None:
        where = ("no pixel of the model's 336-px frame" if pixels else
                 "no cell of the model's 24x24 grid (each cell is 14 px of the 336-px image)")
        message = (
            f"region {index + 1} covers {where}, so it is passed to the model as a zero vector. "
            "Draw a larger or thicker region."
        )
        if self.on_empty == "error":
            raise ValueError(message)
        if self.on_empty == "warn":
            warnings.warn(message, EmptyRegionWarning, stacklevel=3)
