"""`TextFamily`: the adapter of families that answer in text only (Med-MoE, Llama3-Med).

The family model brings its own template, image preprocessing, tokenizer and ``generate(rgb, question,
history=..., ...)``; this adapter hands it the plane as 8-bit RGB and the question, and says what the
family cannot do (regions and masks are refused by the session with ``info.lacks(...)``; a "segment
the X" question is answered in text with a warning). Nothing is cached between calls.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import AskRequest, Caches, Generated, SegmentRequest, Turn


@contextlib.contextmanager
def loading(on_progress: Callable[[str, int, int], None] | None) -> Iterator[None]:
    """``on_progress("loading", 0, 1)`` before the block and ``("loading", 1, 1)`` after it."""
    if on_progress:
        on_progress("loading", 0, 1)
    yield
    if on_progress:
        on_progress("loading", 1, 1)


@dataclass(frozen=True)
class TextPlane:
    """The plane as 8-bit RGB; no content key (nothing is cached)."""

    rgb: np.ndarray
    image_hw: tuple[int, int]
    key: str = ""


class TextFamily:
    """A family model with ``generate(rgb, question, ...) -> (text, ids[, extra])`` and no regions or masks."""

    batches_planes = False

    def __init__(self, info, model: Any, caches: Caches, template: str | None = None) -> None:
        self.info = info
        self.capabilities = info.capabilities
        self.model = model
        self.caches = caches
        self.template = None  # the family's own template; a MedPLIB template name does not apply

    def fingerprint(self) -> str:
        from ..engine.loading import model_fingerprint

        return model_fingerprint(self.model)

    def inference(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        self.model = None

    def check_request(self, request: AskRequest) -> AskRequest:
        return request

    def prepare_image(self, image, contrast_limits, rgb) -> TextPlane:
        from ..imaging import to_model_rgb

        array = np.asarray(image)
        return TextPlane(to_model_rgb(array, contrast_limits=contrast_limits, rgb=rgb), tuple(array.shape[:2]))

    def embed(self, plane: TextPlane, on_progress=None) -> None:
        """No image embedding is kept for these families."""

    def build_prompt(self, turn: Turn) -> tuple[str, list[tuple[str, str]]]:
        """The question and earlier turns; the family model applies its own template."""
        return turn.request.question, list(turn.request.history)

    def encode_regions(self, turn: Turn) -> None:
        return None  # the session refuses regions for these families

    def generate(self, turn: Turn) -> Generated:
        request = turn.request
        question, history = turn.prompt
        mark = time.perf_counter()
        result = self.model.generate(turn.plane.rgb, question, history=history, max_new_tokens=request.max_new_tokens,
                                     temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                                     on_text=turn.on_text, should_stop=turn.should_stop)
        turn.timings["generate"] = time.perf_counter() - mark
        text, ids = result[0], list(result[1])
        share, mean = self.expert_shares(result)
        finish = ("cancelled" if turn.should_stop()
                  else "max_new_tokens" if len(ids) >= request.max_new_tokens else "eos")
        return Generated(text, ids, finish, share, mean, raw=result)

    def expert_shares(self, result: tuple) -> tuple[list[list[float]] | None, list[float] | None]:
        """Share of answer tokens per expert, per MoE layer and averaged; None for models without experts."""
        return None, None

    def decode_masks(self, turn: Turn) -> dict[str, Any]:
        """No masks; a question that asks for them gets the reason as a warning."""
        warnings = [self.info.lacks("masks")] if "segment" in turn.request.question.lower() else []
        return {"masks": [], "warnings": warnings}

    def segment(self, request: SegmentRequest):
        from ..engine.errors import SessionInputError

        raise SessionInputError(self.info.lacks("masks"))

    def ask_batch(self, planes, regions, request, stop):
        raise NotImplementedError("text-only families answer plane by plane (batches_planes is False)")
