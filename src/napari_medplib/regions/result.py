"""`RegionResult`: the regions one conversion produced, and a readable account of what it skipped.

Designed for two consumers: the UI shows ``summary()`` (or the ``problems``) in a notification, and
the CLI prints ``str(err)`` of the `RegionError` from ``raise_if_empty()`` as its one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .region import Region, RegionError

SKIP_REASONS = ("outside", "empty", "other_slice", "invalid", "unsupported")


@dataclass(frozen=True)
class Skipped:
    """A layer item that gave no region: ``reason`` (in SKIP_REASONS) and ``message`` in words."""

    index: int | None
    reason: str
    message: str


@dataclass(frozen=True)
class RegionResult:
    """Regions from one or more layers on one image plane, plus what was skipped and why."""

    regions: tuple[Region, ...]
    skipped: tuple[Skipped, ...]
    image_shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self):
        return iter(self.regions)

    def __getitem__(self, i: int) -> Region:
        return self.regions[i]

    def __add__(self, other: RegionResult) -> RegionResult:
        if tuple(other.image_shape) != tuple(self.image_shape):
            raise RegionError(
                f"cannot combine regions of images {self.image_shape} and {other.image_shape}"
            )
        return RegionResult(
            self.regions + other.regions, self.skipped + other.skipped, self.image_shape
        )

    @property
    def problems(self) -> tuple[Skipped, ...]:
        """Skipped items worth telling the user about (items on other slices are expected)."""
        return tuple(s for s in self.skipped if s.reason != "other_slice")

    def summary(self) -> str:
        """One line: how many regions, and what was skipped."""
        n = len(self.regions)
        parts = [f"{n} region{'s' if n != 1 else ''}"]
        parts += [s.message for s in self.problems]
        elsewhere = len(self.skipped) - len(self.problems)
        if elsewhere:
            parts.append(f"{elsewhere} on other slices ignored")
        return "; ".join(parts)

    def raise_if_empty(self) -> RegionResult:
        """Return self, or raise `RegionError` with the summary when no usable region remains."""
        if not self.regions:
            reasons = (
                "; ".join(s.message for s in self.skipped[:5])
                or "no shapes, points or labels given"
            )
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            raise RegionError(f"no usable region: {reasons}{more}", self.skipped)
        return self

    def masks(self) -> list[np.ndarray]:
        """Full-size masks, one per region (memory: one image plane each)."""
        return [r.to_mask(self.image_shape) for r in self.regions]

    def to_labels(self) -> np.ndarray:
        """int32 label image: region i gets value i + 1; later regions overwrite earlier ones."""
        out = np.zeros(self.image_shape, dtype=np.int32)
        for i, region in enumerate(self.regions):
            crop, (r0, c0) = region.crop(self.image_shape)
            out[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]][crop] = i + 1
        return out
