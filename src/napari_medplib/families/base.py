"""The interface every model family implements, and the plain records `Session` hands it.

`engine.session.Session` keeps what is the same for every model: residency (load, close), the caches,
the lock, cancel, input checks and the public API. What differs between families is behind one
adapter object per loaded model (`ModelFamily`): how the image is prepared (views, crops, scales),
how regions are read, how the prompt is built, how the answer is generated, how masks are decoded,
and what the family can do at all (`Capabilities`). Adapters:

* MedPLIB, released checkpoints and the bundled model's extensions: `families.medplib.MedPLIBFamily`;
* Med-MoE: `families.medmoe.adapter.MedMoEFamily`; Llama3-Med: `families.llama3med.adapter.Llama3MedFamily`
  (both text-only, on `families.text.TextFamily`).

This module imports neither torch nor the engine: the engine imports it, adapters import the engine's
helpers, and nothing imports back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import Any, Protocol


@dataclass(frozen=True, eq=False)
class Capabilities(Mapping):
    """What a family can do; read like a dict (``caps["masks"]``, ``dict(caps)``, ``caps == {...}``)."""

    regions: bool = False  # reads marked regions (points, boxes, masks) named in the question
    masks: bool = False  # answers with masks (``<SEG>``) and segments direct prompts
    streaming: bool = True  # text arrives token by token
    experts: bool = False  # reports the share of answer tokens per expert
    multiscale: bool | None = None  # sees the image at several resolutions (None: not said)

    def _items(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, key: str) -> bool:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"Capabilities({self._items()})"


@dataclass
class Caches:
    """The session's caches, lent to its adapter (the session owns, bounds and clears them).

    ``features``: per content key, what the encoders made of a plane (LRU by bytes); ``prefixes``: prompt
    prefix KV caches; ``views``: prepared planes by the raw plane's content; ``disk``: an optional
    on-disk embedding cache (``engine.disk_cache.DiskEmbeddingCache``) or None.
    """

    features: Any
    prefixes: Any
    views: Any
    disk: Any = None


@dataclass(frozen=True)
class AskRequest:
    """One question's settings, checked by the session; ``generation`` is the family's own form of them."""

    question: str
    template: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    history: Sequence[tuple[str, str]] = ()
    mask_mode: str = "corrected"
    instances: bool = True
    contrast_limits: Any = None
    rgb: bool | None = None
    generation: Any = None


@dataclass
class Turn:
    """One answer on one plane while it is made: the session fills in what each adapter step returns."""

    request: AskRequest
    image: Any  # the caller's plane
    plane: Any  # the adapter's prepared image (``key``, ``image_hw``)
    regions: list  # the regions, bound to the plane (question order is the adapter's business)
    on_text: Callable[[str], None] | None = None
    on_progress: Callable[[str, int, int], None] | None = None
    should_stop: Callable[[], bool] = lambda: False
    timings: dict[str, float] = field(default_factory=dict)
    prompt: Any = None
    regions_read: Any = None
    answer: Generated | None = None


@dataclass
class Generated:
    """What generation gave: the text and token ids, why it stopped, expert shares; ``raw``: the family's
    own result (hidden states for masks and so on)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    expert_share: list[list[float]] | None = None
    expert_share_mean: list[float] | None = None
    raw: Any = None


@dataclass(frozen=True)
class SegmentRequest:
    """Direct prompts on one plane (see `Session.segment`), checked by the session."""

    image: Any
    points: Any = None
    point_labels: Any = None
    box: Any = None
    mask: Any = None
    multimask: bool = False
    contrast_limits: Any = None
    rgb: bool | None = None
    mask_mode: str = "corrected"
    on_progress: Callable[[str, int, int], None] | None = None
    window: str | int | None = "auto"
    clip_to_box: bool = True
    clicked_pieces: bool = True
    flips: bool = False


class ModelFamily(Protocol):
    """One loaded model of one family, as `Session` drives it (the session holds its lock around every call).

    The steps of an answer, in the order the session calls them (`Turn` carries the results)::

        plane = prepare_image(image, contrast_limits, rgb)   # the view the model sees (cached by the adapter)
        turn.prompt = build_prompt(turn)                      # template, token ids, region order
        turn.regions_read = encode_regions(turn)              # the regions as this family reads them
        turn.answer = generate(turn)                          # encoders, prefill, decoding -> `Generated`
        fields = decode_masks(turn)                           # masks and other Reply fields of the answer
    """

    info: Any  # the registry's `Family`: name, ``lacks(capability)``
    capabilities: Capabilities
    template: str | None  # the default prompt template, None where the family has one fixed template
    model: Any
    batches_planes: bool  # ``ask_batch`` answers many planes at once; else the session asks plane by plane

    def fingerprint(self) -> str: ...
    def inference(self) -> AbstractContextManager: ...
    def check_request(self, request: AskRequest) -> AskRequest: ...  # may raise ValueError
    def prepare_image(self, image: Any, contrast_limits: Any, rgb: bool | None) -> Any: ...
    def build_prompt(self, turn: Turn) -> Any: ...
    def encode_regions(self, turn: Turn) -> Any: ...
    def generate(self, turn: Turn) -> Generated: ...
    def decode_masks(self, turn: Turn) -> dict[str, Any]: ...
    def embed(self, plane: Any, on_progress: Callable | None) -> None: ...
    def segment(self, request: SegmentRequest) -> Any: ...
    def ask_batch(self, planes: Sequence[Any], regions: Sequence[Any], request: AskRequest,
                  stop: Callable[[], bool]) -> list[dict[str, Any]] | None: ...
    def close(self) -> None: ...
