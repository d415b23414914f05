"""What a batch run does to every item, and the fingerprint that decides what "already done" means.

The fingerprint covers everything that changes an item's outputs (the actions, the model's identity,
precision and generation settings, tiling); it leaves out what only changes speed or where the work
runs (device, workers, scheduler, retries). Two runs with the same fingerprint into one folder are
one run resumed; a different fingerprint is another run, which the folder refuses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

#: Planes larger than this (pixels per side) are processed in tiles read lazily from the file.
TILE_ABOVE = 4096
#: Tile side and overlap (pixels) for grounding on large planes: the model sees each tile as an image.
TILE_SIZE = 1024
TILE_OVERLAP = 128
#: The most planes one input file may contribute (a T x Z stack is T*Z planes).
MAX_PLANES_PER_FILE = 100_000
#: The most pixels of a plane read in tiles (a 65,536 x 65,536 plane); larger files are refused.
MAX_TILED_PIXELS = 65_536 * 65_536


class BatchError(ValueError):
    """A problem with the run as a whole (options, output folder, cluster); the message says the fix."""


class ItemError(ValueError):
    """A problem with one input (unreadable, unsupported, regions outside it); recorded, not fatal."""


@dataclass(frozen=True)
class Actions:
    """The questions and prompts applied to every plane."""

    ask: tuple[str, ...] = ()  # free questions: one answer each
    ground: tuple[str, ...] = ()  # "Please segment the nuclei.": instance labels + one row per object
    segment: bool = False  # prompts from the region file next to each image
    regions_pattern: str = "{stem}.geojson"  # region file name, relative to the image's folder

    def __post_init__(self) -> None:
        if not (self.ask or self.ground or self.segment):
            raise BatchError("nothing to do: give --ask QUESTION, --ground QUESTION and/or --segment")
        for question in self.ask + self.ground:
            if not question.strip():
                raise BatchError("a question is empty; write it in quotes, e.g. --ground \"Please segment the nuclei.\"")
        if self.segment and "{stem}" not in self.regions_pattern and "{name}" not in self.regions_pattern:
            raise BatchError(f"--regions-pattern {self.regions_pattern!r} must contain {{stem}} or {{name}} "
                             "(the image file's name without / with its extension)")

    def names(self) -> list[str]:
        """One short name per action, used in output file names (ground, ground2, ask, segment, ...)."""
        out = [("ground" if i == 0 else f"ground{i + 1}") for i in range(len(self.ground))]
        if self.segment:
            out.append("segment")
        return out


@dataclass(frozen=True)
class BatchOptions:
    """Everything a worker needs besides the item: actions, model and how to read planes."""

    actions: Actions
    model: str | None = None  # folder or name; None = the bundled model
    device: str = "auto"
    dtype: str | None = None
    llm_weights: str = "full"  # "int8": the language model with int8 weights (Session.load(llm_weights=...))
    channel: int | None = None
    plane: dict[str, int] | int | None = None  # one plane of every stack; None = all planes
    max_new_tokens: int = 256
    temperature: float = 0.0
    mask_mode: str = "corrected"
    tile_above: int = TILE_ABOVE
    tile_size: int = TILE_SIZE
    tile_overlap: int = TILE_OVERLAP
    threads: int = 1  # torch threads per worker (CPU inference)
    model_fingerprint: str = ""  # filled in by the driver from the model folder
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tile_overlap * 2 >= self.tile_size:
            raise BatchError(f"--tile-overlap {self.tile_overlap} must be under half of --tile {self.tile_size}")
        if self.tile_size < 256:
            raise BatchError(f"--tile {self.tile_size}: tiles must be at least 256 px")
        if self.llm_weights not in ("full", "int8"):
            raise BatchError(f"--llm-weights {self.llm_weights!r}: choose full or int8")

    def fingerprint(self) -> str:
        """What makes two runs' outputs the same (see the module docstring)."""
        kept = asdict(self)
        for name in ("device", "threads", "model"):
            kept.pop(name)
        if kept["llm_weights"] == "full":  # runs from before the option keep their fingerprint
            kept.pop("llm_weights")
        text = json.dumps(kept, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()

    def describe(self) -> dict[str, object]:
        """The options as run.json records them."""
        return json.loads(json.dumps(asdict(self), default=str))
