"""A session for families that answer in text only (Med-MoE, Llama3-Med): same methods as `Session`.

The widget, the CLI, batch runs and the server call `ask`, `ask_stream`, `ask_planes`, `segment`,
`cancel`, `clear_cache` and `close` on whatever `Session.load` returns; for these families that is a
`ChatSession`, which runs the family model's own `generate` (its template, image preprocessing and
tokenizer) and says plainly what the family cannot do: regions and masks raise `SessionInputError`
with the reason, and ``capabilities`` lets callers disable those features beforehand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..families.registry import Family
from .errors import SessionClosedError, SessionInputError
from .reply import AskStream, Reply


class ChatSession:
    """One loaded text-only model; calls are serialised by a lock (the model keeps state per call)."""

    def __init__(self, model: Any, family: Family, name: str, fingerprint: str = "", device: str = "cpu") -> None:
        self._model = model
        self.family = family
        self.model_name = name
        self.fingerprint = fingerprint
        self.device = device
        self.capabilities = dict(family.capabilities)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._closed = False

    @classmethod
    def load(cls, folder: Path, family: Family, device: str, dtype: Any, name: str, fingerprint: str) -> ChatSession:
        return cls(family.load(folder, device, dtype), family, name, fingerprint, device)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"ChatSession({self.model_name!r}, family={self.family.name}, device={self.device!r})"

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._model = None

    def cancel(self) -> None:
        self._cancel.set()

    def clear_cache(self) -> None:
        """Nothing is cached between calls (each answer encodes its image afresh)."""

    def cache_info(self) -> dict[str, Any]:
        return {}

    def embed(self, image, contrast_limits=None, rgb=None, on_progress=None) -> str:
        """No image embedding is kept for these families; returns an empty key."""
        return ""

    # ---- answers ------------------------------------------------------------------------------
    def _check(self, question: str, regions: Sequence[Any]) -> None:
        if self._closed:
            raise SessionClosedError("the session is closed; load the model again")
        if not isinstance(question, str) or not question.strip():
            raise SessionInputError("the question is empty; type a question about the image")
        if len(regions) or "<region" in question:
            raise SessionInputError(self.family.lacks("regions"))

    def ask(self, image, question: str, regions: Sequence[Any] = (), *, max_new_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, contrast_limits=None, rgb: bool | None = None,
            on_text: Callable[[str], None] | None = None, on_progress=None, cancel: threading.Event | None = None,
            history: Sequence[tuple[str, str]] = (), seed: int | None = None, **_ignored: Any) -> Reply:
        """Answer ``question`` about one plane in text (``masks`` is always empty)."""
        from ..imaging import to_model_rgb

        self._check(question, regions)
        self._cancel.clear()
        rgb_plane = to_model_rgb(np.asarray(image), contrast_limits=contrast_limits, rgb=rgb)

        def stop() -> bool:
            return self._cancel.is_set() or (cancel is not None and cancel.is_set())

        started = time.perf_counter()
        with self._lock:
            if self._model is None:
                raise SessionClosedError("the session is closed; load the model again")
            result = self._model.generate(rgb_plane, question, history=history, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, seed=seed, on_text=on_text,
                                          should_stop=stop)
        text, ids = result[0], list(result[1])
        shares, mean = _expert_shares(result[2]) if len(result) > 2 else (None, None)
        warnings = []
        if "segment" in question.lower():
            warnings.append(self.family.lacks("masks"))
        finish = "cancelled" if stop() else ("max_new_tokens" if len(ids) >= max_new_tokens else "eos")
        return Reply(text=text, masks=[], regions=[], question=question, model=self.model_name, finish_reason=finish,
                     timings={"total": time.perf_counter() - started}, expert_share=shares,
                     expert_share_mean=mean, warnings=warnings, token_ids=ids)

    def ask_stream(self, image, question: str, regions: Sequence[Any] = (), **kwargs: Any) -> AskStream:
        """Like `ask`, as an iterator of text pieces; ``stream.reply`` holds the Reply afterwards."""
        if "on_text" in kwargs:
            raise SessionInputError("ask_stream() yields the text pieces itself; do not pass on_text")
        self._check(question, regions)
        user_cancel = kwargs.pop("cancel", None)

        def run(emit: Callable[[str], None], stream_cancel: threading.Event) -> Reply:
            both = _Either(stream_cancel, user_cancel)
            return self.ask(image, question, regions, on_text=emit, cancel=both, **kwargs)

        return AskStream(run)

    def ask_planes(self, planes, question: str, regions: Sequence[Any] = (), **kwargs: Any) -> list[Reply]:
        """One answer per plane, in order."""
        kwargs.pop("on_progress", None)
        kwargs.pop("batch_size", None)
        return [self.ask(plane, question, regions, **kwargs) for plane in planes]

    def segment(self, *args: Any, **kwargs: Any) -> Any:
        raise SessionInputError(self.family.lacks("masks"))


class _Either:
    """An Event-like "is either set" over two optional events (the stream's and the caller's)."""

    def __init__(self, first: threading.Event, second: threading.Event | None) -> None:
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.first.is_set() or (self.second is not None and self.second.is_set())


def _expert_shares(choices: Any) -> tuple[list[list[float]] | None, list[float] | None]:
    """Share of answer tokens per routed expert (first choice), per MoE layer and averaged."""
    try:
        experts = np.asarray(choices.answer_experts)[..., 0]  # [n_moe, T']
        width = int(max(choices.num_experts))
    except (AttributeError, IndexError, ValueError, TypeError):
        return None, None
    if experts.size == 0:
        return None, None
    shares = [(np.bincount(row, minlength=width) / max(len(row), 1)).tolist() for row in experts]
    return shares, np.mean(np.asarray(shares), axis=0).tolist()
