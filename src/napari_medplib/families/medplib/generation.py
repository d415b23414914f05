"""MedPLIB's prompt and generation: the template and token ids, then CLIP, the cached prefix and decoding."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ...engine.errors import SessionInputError
from ...engine.reply import expert_shares
from ..base import AskRequest, Generated, Turn
from . import familiarity, region_view


@dataclass
class Prompt:
    """A question as token ids, with the order in which it names the regions (indices into the regions)."""

    ids: list[int]
    order: list[int]


def check_request(family, request: AskRequest) -> AskRequest:
    """The request with its ``GenerationConfig`` (raises ValueError for a bad template or setting)."""
    from ...model.generation import GenerationConfig
    from ...model.tokenizer import get_template

    config = GenerationConfig(
        max_new_tokens=int(request.max_new_tokens), temperature=request.temperature, top_p=float(request.top_p),
        stop_strings=get_template(request.template).stop_strings, eos_token_id=family.model.config.eos_token_id,
        seed=request.seed,
    )
    return dataclasses.replace(request, generation=config)


def build_prompt(family, question: str, n_regions: int, template: str, history=()) -> Prompt:
    """Token ids of the templated question; ``<region>`` / ``<regionK>`` bound to the regions."""
    from ...model.tokenizer import encode_question

    try:
        ids, order = encode_question(family.model.tokenizer, question, n_regions, template, history)
    except ValueError as err:
        raise SessionInputError(str(err).splitlines()[0]) from None
    return Prompt(ids, order)


def generate(family, turn: Turn) -> Generated:
    """CLIP features (cached), the prefix KV cache (cached), then decoding with the question's regions.
    Adds ``vision``, ``prefill`` and ``generate`` to ``turn.timings``."""
    import torch

    model, view, request, timings = family.model, turn.plane, turn.request, turn.timings
    config = request.generation
    mark = time.perf_counter()
    features = family.clip_features(view, turn.on_progress)
    timings["vision"] = time.perf_counter() - mark

    prompt: Prompt = turn.prompt
    decline, suppress_first = familiarity.gate(family, [view], features, bool(turn.regions))
    if decline[0]:  # unlike the microscopy the model knows: decline without decoding
        result = familiarity.declined_result(family, features.image_tokens[0])
        if turn.on_text:
            turn.on_text(result.text)
        timings["prefill"] = timings["generate"] = 0.0
        return Generated(result.text, list(result.ids), result.finish_reason, None, None, raw=result)
    if suppress_first[0]:
        config = dataclasses.replace(config, suppress_first=suppress_first[0])
    prefix, timings["prefill"] = family.prefix(view, request.template, prompt.ids, features)
    if turn.on_progress:
        turn.on_progress("generating", 0, config.max_new_tokens)
    mark = time.perf_counter()
    regions = turn.regions_read
    seen = region_view.with_crop(family, view, regions.crop, features, turn.on_progress)  # region tokens' view
    result = model.generate(
        torch.tensor(prompt.ids), region_masks=regions.region_masks, image_features=seen, config=config,
        stream=turn.on_text, should_stop=turn.should_stop, prefix=prefix, region_objects=regions.region_objects,
    )
    timings["generate"] = time.perf_counter() - mark
    if turn.on_progress:
        turn.on_progress("generating", len(result.all_ids), config.max_new_tokens)
    share, share_mean = expert_shares(result.expert_counts)
    return Generated(result.text, list(result.ids), result.finish_reason, share, share_mean, raw=result)
