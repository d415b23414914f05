"""Multi-scale ("S2") image encoding: see a large image at several resolutions through a fixed-size encoder.

A vision encoder takes tiles of one size (e.g. 378 px). To let it see an image at 1134 px, the image
is resized to every scale in a list (378, 756, 1134), each resized image is cut into an n x n
chessboard of encoder-sized tiles (n = scale / tile), all tiles of a scale are encoded in one batch,
the tile feature maps are stitched back into one map per scale (27, 54, 81 cells per side), each map
is area-pooled to the base grid of the smallest scale (27 x 27), and the pooled maps are concatenated
along channels. The result has as many tokens as one plain pass, each ``len(scales)`` times wider,
and the fine scales carry detail that a single 378 px pass loses.

This is how Llama3-Med encodes images (its S2 wrapper); the functions are written for any encoder
that maps ``[N, C, t, t]`` tiles to ``[N, D, g, g]`` feature maps, so other families can reuse them,
e.g. to look at a region of a large microscopy plane at a useful resolution::

    encode = lambda tiles: tokens_to_map(clip_patch_tokens(tiles))   # [N, 3, t, t] -> [N, D, g, g]
    features = multiscale_encode(encode, crop[None], scales=(336, 672, 1008))  # [1, 3*D, g, g]

Numerics follow the reference: bicubic resize in float32 without antialias (``align_corners=False``;
the largest scale is an identity when the input already has that size), tiles stacked tile-major on
the batch axis (for one image: row-major tile order), area pooling (exact averaging for the integer
factors that scales which are multiples of the tile size give).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["MultiScaleOutput", "merge_tiles", "multiscale_encode", "split_tiles", "tokens_to_map"]

Encoder = Callable[[torch.Tensor], torch.Tensor]  # [N, C, t, t] -> [N, D, g, g]


def split_tiles(images: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C, H, W] -> [n*n*B, C, H/n, W/n]: an n x n chessboard, tile-major (tile i*n + j of every
    image, then the next tile), so for one image the tiles are in row-major order."""
    b, c, h, w = images.shape
    if h % n or w % n:
        raise ValueError(f"a {h}x{w} image does not split into {n}x{n} equal tiles")
    th, tw = h // n, w // n
    return torch.cat([images[..., i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(n) for j in range(n)])


def merge_tiles(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`split_tiles`: [n*n*B, D, h, w] -> [B, D, n*h, n*w]."""
    if tiles.shape[0] % (n * n):
        raise ValueError(f"{tiles.shape[0]} tiles are not a multiple of {n}x{n}")
    per_tile = tiles.chunk(n * n, dim=0)  # each [B, D, h, w]
    rows = [torch.cat(per_tile[i * n : (i + 1) * n], dim=-1) for i in range(n)]  # each [B, D, h, n*w]
    return torch.cat(rows, dim=-2)


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """[N, g*g, D] patch tokens (row-major, no prefix tokens) -> [N, D, g, g] feature map."""
    n, p, d = tokens.shape
    g = math.isqrt(p)
    if g * g != p:
        raise ValueError(f"{p} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(n, d, g, g)


@dataclass
class MultiScaleOutput:
    """``features`` [B, D*len(scales), g, g] on the base grid; per scale (ascending) the intermediates
    when they were asked for (``keep_intermediates=True``), for debugging and parity checks."""

    features: torch.Tensor
    scales: tuple[int, ...]
    images: list[torch.Tensor] = field(default_factory=list)  # [B, C, s, s] resized image per scale
    tiles: list[torch.Tensor] = field(default_factory=list)  # [n*n*B, C, t, t]
    tile_features: list[torch.Tensor] = field(default_factory=list)  # [n*n*B, D, g, g] encoder output
    feature_maps: list[torch.Tensor] = field(default_factory=list)  # [B, D, n*g, n*g] stitched


def multiscale_encode(
    encoder: Encoder,
    images: torch.Tensor,
    scales: Sequence[int],
    tile_size: int | None = None,
    *,
    resize_mode: str = "bicubic",
    max_tiles_per_batch: int | None = None,
    keep_intermediates: bool = False,
) -> MultiScaleOutput:
    """Encode ``images`` [B, C, H, W] at every scale and merge the results on the base grid.

    ``scales``: target sizes (square), used in ascending order; each must be a multiple of
    ``tile_size`` (default: the smallest scale). ``encoder`` maps tiles [N, C, t, t] to feature maps
    [N, D, g, g]. Tiles of a scale go through the encoder in one batch (or in chunks of
    ``max_tiles_per_batch`` to bound memory). Returns [B, D * len(scales), g0, g0] where g0 x g0 is
    the encoder's grid for one tile (the smallest scale's map when ``tile_size`` is that scale),
    channels ordered by ascending scale.
    """
    ordered = tuple(sorted(int(s) for s in scales))
    if not ordered:
        raise ValueError("at least one scale is needed")
    tile = int(tile_size) if tile_size is not None else ordered[0]
    bad = [s for s in ordered if s % tile]
    if bad:
        raise ValueError(f"scales {bad} are not multiples of the tile size {tile}")
    out = MultiScaleOutput(features=images.new_empty(0), scales=ordered)
    pooled: list[torch.Tensor] = []
    base_hw: tuple[int, int] | None = None
    for scale in ordered:
        pixels = images.float()  # the reference resizes in float32 whatever the model dtype
        if pixels.shape[-2:] != (scale, scale):
            pixels = F.interpolate(pixels, size=(scale, scale), mode=resize_mode)
        n = scale // tile
        tiles = split_tiles(pixels, n)  # [n*n*B, C, tile, tile]
        if max_tiles_per_batch:
            encoded = torch.cat([encoder(chunk) for chunk in tiles.split(max_tiles_per_batch)])
        else:
            encoded = encoder(tiles)  # [n*n*B, D, g, g]
        feature_map = merge_tiles(encoded, n)  # [B, D, n*g, n*g]
        if base_hw is None:
            base_hw = (encoded.shape[-2], encoded.shape[-1])
        pooled.append(F.interpolate(feature_map, size=base_hw, mode="area"))  # [B, D, g0, g0]
        if keep_intermediates:
            out.images.append(pixels)
            out.tiles.append(tiles)
            out.tile_features.append(encoded)
            out.feature_maps.append(feature_map)
    out.features = torch.cat(pooled, dim=1)  # [B, D * len(scales), g0, g0]
    return out
