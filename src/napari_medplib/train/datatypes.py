"""The shared training data types: a sample, a region, a conversation, and the tokens they carry.

The generator (`synth`), the templates (`conversations`) and the "I can't tell" answers (`unknown`)
import them from here, so that `data` can import those modules to build a synthetic split without
an import cycle; `data` re-exports every name, and ``from napari_medplib.train.data import Sample``
keeps working. numpy only: no torch, no napari, and no import of any other training module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["REGION_TOKEN", "SEG_TOKEN", "TASKS", "Conversation", "RegionSpec", "Sample", "SyntheticSample",
           "Task"]


@dataclass(eq=False)
class Sample:
    """One image with instance labels. `image` is (H, W) or (H, W, C) channels-last, uint8/uint16."""

    image: np.ndarray
    labels: np.ndarray  # (H, W) int32 instance ids, 0 = background
    categories: dict[int, str]  # instance id -> category name
    style: str  # a key of STYLES, or "user" for converted annotations
    meta: dict[str, Any] = field(default_factory=dict)  # seed, bit_depth, modality, size_thresholds...

    def category_mask(self, category: str) -> np.ndarray:
        """Union of all instances of `category` (the grounding target)."""
        ids = [i for i, c in self.categories.items() if c == category]
        return np.isin(self.labels, ids)

    def instances_of(self, category: str) -> list[int]:
        return sorted(i for i, c in self.categories.items() if c == category)


#: The name the training issue uses; every sample, synthetic or converted, is a `Sample`.
SyntheticSample = Sample

#: The grounding token as the reference writes it in answers ("It is <SEG>."), and the region
#: placeholder as questions carry it (the engine expands it to "<region></region>" + the feature).
SEG_TOKEN = "<SEG>"
REGION_TOKEN = "<region>"
TASKS = ("grounding", "region_vqa", "vqa")
Task = Literal["grounding", "region_vqa", "vqa"]


# ----------------------------------------------------------------------------- conversations
@dataclass(eq=False)
class RegionSpec:
    """A region in napari (row, col) pixel coordinates: a box, a point, or a boolean mask.

    Box corners are pixel centres, both inclusive: pixel (r, c) is in (y0, x0, y1, x1) when
    y0 <= r <= y1 and x0 <= c <= x1 (the tight box of a mask is (rmin, cmin, rmax, cmax)).
    """

    kind: Literal["box", "point", "mask"]
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        need = {"box": self.box, "point": self.point, "mask": self.mask}
        if self.kind not in need or need[self.kind] is None:
            raise ValueError(f"RegionSpec(kind={self.kind!r}) needs its {self.kind!r} geometry")

    def to_mask(self, shape: tuple[int, int], point_radius: int = 20) -> np.ndarray:
        """Rasterise; a point becomes the reference's (2r+1)^2 square (41x41 by default)."""
        if self.kind == "mask":
            return np.asarray(self.mask, bool)
        out = np.zeros(shape, bool)
        if self.kind == "box":
            y0, x0, y1, x1 = self.box
            r0, c0 = max(int(np.ceil(y0)), 0), max(int(np.ceil(x0)), 0)
            out[r0 : int(np.floor(y1)) + 1, c0 : int(np.floor(x1)) + 1] = True
        else:
            y, x = (int(round(v)) for v in self.point)  # noqa: RUF046 (numpy floats round to floats)
            out[max(y - point_radius, 0) : y + point_radius + 1,
                max(x - point_radius, 0) : x + point_radius + 1] = True
        return out


@dataclass(eq=False)
class Conversation:
    """One question/answer turn about one image, with the geometry its placeholders stand for."""

    question: str
    answer: str
    task: Task
    kind: str
    regions: list[RegionSpec] = field(default_factory=list)
    target_masks: list[np.ndarray] = field(default_factory=list)  # one per <SEG>, in order
    canonical: str = ""  # short answer for exact-match scoring ("" for grounding)
    choices: tuple[str, ...] = ()  # closed answer set of this kind, when it has one
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. label_ids behind targets/regions

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.question.count(REGION_TOKEN) != len(self.regions):
            raise ValueError(f"{len(self.regions)} regions but question has "
                             f"{self.question.count(REGION_TOKEN)} {REGION_TOKEN}: {self.question!r}")
        if self.answer.count(SEG_TOKEN) != len(self.target_masks):
            raise ValueError(f"{len(self.target_masks)} target masks but answer has "
                             f"{self.answer.count(SEG_TOKEN)} {SEG_TOKEN}: {self.answer!r}")
