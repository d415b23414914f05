"""Token-by-token decoding with a KV cache: greedy or sampled, stop strings, streaming, cancellation.

The loop is model-agnostic: it is given the logits/hidden state of the prompt's last position and a
``step(token_id)`` callable that feeds one token through the cached model. It keeps, for every new
token, the final-norm hidden state that *predicted* it: for a ``<SEG>`` token that is the state the
reference gives ``text_hidden_fcs`` (LISA semantics).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

StepFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # token id -> (logits [V], hidden [D])


@dataclass
class GenerationConfig:
    """``temperature`` 0 means greedy (as the reference worker: T < 1e-4 is greedy)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop_strings: Sequence[str] = ()
    eos_token_id: int | None = 2
    seed: int | None = None
    suppress_first: Sequence[int] = ()  # token ids the answer may not start with

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    ids: list[int]  # new token ids (without the eos token)
    text: str  # decoded, stripped, cut at the first stop string
    finish_reason: str  # "eos" | "stop_string" | "max_new_tokens" | "cancelled"
    step_hidden: torch.Tensor  # [n, D] hidden state that predicted each new id (incl. a final eos)
    step_logits: torch.Tensor | None = None  # [n, V] float32 logits that produced each id
    expert_counts: torch.Tensor | None = None  # [MoE layers, E] tokens per expert over the answer
    all_ids: list[int] = field(default_factory=list)  # every sampled id, eos included
    region_empty: list[bool] | None = None  # per region slot: True when the region covered no grid cell

    def seg_indices(self, seg_token_id: int) -> list[int]:
        """Indices (into ``ids``/``step_hidden``) of every ``<SEG>`` in the answer."""
        return [i for i, t in enumerate(self.ids) if t == seg_token_id]


def suppress(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """logits [..., V] with ``token_ids`` made impossible (a copy)."""
    out = logits.clone()
    out[..., list(token_ids)] = float("-inf")
    return out


def select_next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [V] -> next id: argmax when temperature == 0, else nucleus sampling of softmax(l / T)."""
    if temperature < 1e-4:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class IncrementalDecoder:
    """Turns ids into new text pieces as they arrive, so multi-byte characters split over byte tokens
    are only emitted once complete, leading whitespace is dropped (the reference strips), and text
    that may be the start of a stop string is held back."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the current text already handed out
        self.stopped = False

    def text(self) -> str:
        text = self.decode(self.ids).lstrip()
        for stop in self.stop_strings:
            cut = text.find(stop)
            if cut >= 0:
                text, self.stopped = text[:cut], True
        return text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text()
        if self.stopped:
            return self._take(text, len(text))
        safe = len(text)
        if text.endswith("\ufffd"):  # perhaps an incomplete UTF-8 sequence: wait for more bytes
            safe = len(text.rstrip("\ufffd"))
        for stop in self.stop_strings:  # hold back a possible beginning of a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._take(text, safe)

    def flush(self) -> str:
        text = self.text().rstrip()
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = text[self.emitted : upto]
        self.emitted = upto
        return piece


def generate_tokens(
    step: StepFn,
    first_logits: torch.Tensor,
    first_hidden: torch.Tensor,
    decode: Callable[[list[int]], str],
    config: GenerationConfig,
    stream: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | threading.Event | None = None,
    routing_counts: Callable[[], torch.Tensor | None] | None = None,
    return_step_logits: bool = False,
) -> GenerationResult:
    """Decode up to ``config.max_new_tokens`` tokens.

    ``first_logits`` [V] / ``first_hidden`` [D]: the prompt's last position. ``step(id)`` feeds one id
    and returns the new last logits/hidden. ``should_stop`` is checked before every step (a callable
    or a ``threading.Event``). ``routing_counts()`` returns [layers, E] expert counts of the position
    just computed (summed over the answer).
    """
    generator = None
    if config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    is_cancelled = should_stop.is_set if isinstance(should_stop, threading.Event) else should_stop
    decoder = IncrementalDecoder(decode, config.stop_strings)
    logits, hidden = first_logits, first_hidden
    all_ids: list[int] = []
    hiddens: list[torch.Tensor] = []
    logits_seen: list[torch.Tensor] = []
    counts = routing_counts() if routing_counts else None
    finish = "max_new_tokens"
    for index in range(config.max_new_tokens):
        if is_cancelled is not None and is_cancelled():
            finish = "cancelled"
            break
        if index == 0 and config.suppress_first:
            logits = suppress(logits, config.suppress_first)
        token = select_next_token(logits, config.temperature, config.top_p, generator)
        all_ids.append(token)
        hiddens.append(hidden)
        if return_step_logits:
            logits_seen.append(logits.float())
        if config.eos_token_id is not None and token == config.eos_token_id:
            finish = "eos"
            break
        piece = decoder.push(token)
        if piece and stream is not None:
            stream(piece)
        if decoder.stopped:
            finish = "stop_string"
            break
        if index + 1 < config.max_new_tokens:
            logits, hidden = step(token)
            if routing_counts and (new := routing_counts()) is not None:
                counts = new if counts is None else counts + new
    tail = decoder.flush()
    if tail and stream is not None:
        stream(tail)
    ids = all_ids[:-1] if finish == "eos" else list(all_ids)
    return GenerationResult(
        ids=ids,
        text=decoder.text().strip(),
        finish_reason=finish,
        step_hidden=torch.stack(hiddens) if hiddens else first_hidden.new_zeros((0, first_hidden.shape[-1])),
        step_logits=torch.stack(logits_seen) if return_step_logits and logits_seen else None,
        expert_counts=counts,
        all_ids=all_ids,
    )
