"""One question on many planes (a stack), in batches: MedPLIB's side of `Session.ask_planes`.

Why batches: on the bundled model one plane's answer costs ~0.1 s on a CPU, most of it per-call
overhead (two encoder calls, a prefill and a few decoding steps, each a Python walk over the layers
with tiny tensors). Asked plane by plane, a stack pays it for every plane; here a batch of planes runs
the CLIP tower (and the counter), the prompt, every decoding step and the SAM image encoder as one call
each. Sequences that finish drop out of the KV cache, so one long answer does not make the others wait
in the matrix products. Masks are decoded per plane by the same code as `Session.ask`, and a plane large
enough for the region view (``region_view``) pools its region tokens from the same crop as `Session.ask`.

Results are the fields of the same `Reply` objects `Session.ask` returns, and fill the same caches, so a
later question on one of the planes skips its encoders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...engine.prompts import bind_regions
from ...engine.reply import expert_shares
from ...regions import Region
from ..base import AskRequest
from . import counting, familiarity, region_view
from .generation import build_prompt
from .regions import box_objects, empty_region_warning, object_masks, region_masks, regions_as_read


def ask_batch(
    family,
    planes: Sequence[np.ndarray],
    regions: Sequence[Region],
    request: AskRequest,
    stop: Callable[[], bool],
) -> list[dict[str, Any]] | None:
    """The Reply fields of one batch of planes, in order (the caller holds the session's lock and has checked
    the planes); None when cancelled."""
    model = family.model
    question, mask_mode, contrast_limits, rgb = request.question, request.mask_mode, request.contrast_limits, request.rgb
    start = time.perf_counter()
    views = [family.prepare_image(p, contrast_limits, rgb) for p in planes]
    used = [bind_regions(regions, v.image_hw) for v in views]
    prompt = build_prompt(family, question, len(used[0]), request.template)
    ids, order = prompt.ids, prompt.order
    frames, objects_read, empties, crops = [], [], [], []
    for plane_regions, view in zip(used, views, strict=True):
        read = regions_as_read(family, plane_regions, view)
        crop = region_view.choose(family, read, view)  # as encode_regions picks it
        frame, empty = region_masks(family, read, view, crop)
        objects = object_masks(family, box_objects(family, plane_regions, view), view, crop)
        crops.append(crop)
        frames.append(frame[order] if order else None)
        objects_read.append(objects[order] if order and objects is not None else None)
        empties.append(empty)
    preprocess = time.perf_counter() - start

    mark = time.perf_counter()
    whole = _batch_features(family, views)
    features = region_view.with_crops(family, views, crops, whole)
    vision = time.perf_counter() - mark

    mark = time.perf_counter()
    decline, suppress_first = familiarity.gate(family, views, whole, bool(order))  # on the whole planes
    results = _generate(
        family, ids, features, frames if order else None,
        objects_read if order and any(o is not None for o in objects_read) else None, request.generation, stop,
        suppress_first,
    )
    generate = time.perf_counter() - mark
    if results is None:
        return None
    results = [familiarity.declined_result(family, whole.image_tokens[i]) if no else r
               for i, (r, no) in enumerate(zip(results, decline, strict=True))]

    seg_id = model.tokenizer.seg_token_id
    grounded = [i for i, r in enumerate(results) if r.seg_indices(seg_id)]
    mark = time.perf_counter()
    _batch_sam(family, [views[i] for i in grounded])
    share_batch = (time.perf_counter() - mark) / max(len(grounded), 1)
    n = len(planes)
    replies = []
    for i, (result, view) in enumerate(zip(results, views, strict=True)):
        timings = {"preprocess": preprocess / n, "vision": vision / n, "prefill": 0.0, "generate": generate / n}
        empty = empties[i]
        if result.region_empty is not None:
            empty = sorted(set(empty) | {order[j] for j, e in enumerate(result.region_empty) if e})
        mark = time.perf_counter()
        masks, scores, fields = [], [], {}
        if i in grounded:
            seg_hidden = model.answer_seg_hidden(result)
            masks, scores = family.ground(seg_hidden, view, mask_mode, None, [used[i][j] for j in order])
            if request.instances:  # per-object labels, as ask() makes them
                masks, split = counting.split_instances(family, seg_hidden, masks, view, planes[i], question, used[i],
                                                        mask_mode, contrast_limits, rgb, None, timings)
                fields = counting.instance_fields(split, None, planes[i], [], "")
        timings["masks"] = time.perf_counter() - mark + (share_batch if i in grounded else 0.0)
        timings["total"] = sum(v for k, v in timings.items() if k != "instances")
        timings["batch"] = float(n)
        share, share_mean = expert_shares(result.expert_counts)
        warnings = [empty_region_warning(family, j, used[i][j], view) for j in empty]
        replies.append(dict(
            text=result.text, masks=masks, regions=used[i],
            finish_reason=result.finish_reason, timings=timings, expert_share=share, expert_share_mean=share_mean,
            warnings=warnings, empty_regions=empty, mask_scores=scores, token_ids=list(result.ids),
            image_key=view.key, **fields,
        ))
    return replies


def _batch_features(family, views):
    """Batched `ImageFeatures` [B, ...] of the planes: cached ones reused, the rest in one encoder call
    (and cached per plane, as ``features.clip_features`` would)."""
    import torch

    from ...model.medplib import ImageFeatures
    from ...model.preprocess import frame_brightness, prepare_clip_image

    model, caches = family.model, family.caches
    found = [caches.features.get(("clip", v.key)) for v in views]
    if caches.disk is not None:  # its read/write path lives in clip_features; keep one copy of it
        found = [f if f is not None else family.clip_features(v, None) for f, v in zip(found, views, strict=True)]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        settings = family.clip
        clips = [prepare_clip_image(views[i].rgb, settings.size, settings.mean, settings.std) for i in missing]
        encoded = model.encode_image(torch.cat([c.pixel_values for c in clips]).to(model.device))
        for j, (i, clip) in enumerate(zip(missing, clips, strict=True)):
            peaks = encoded.count_peaks[j : j + 1] if encoded.count_peaks is not None else None
            brightness = frame_brightness(clip)[None].to(model.device) if model.regions_read_brightness else None
            one = ImageFeatures(encoded.patch_features[j : j + 1], encoded.image_tokens[j : j + 1], brightness, peaks)
            caches.features.put(("clip", views[i].key), one)
            found[i] = one

    def cat(name: str):
        parts = [getattr(f, name) for f in found]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return ImageFeatures(cat("patch_features"), cat("image_tokens"), cat("brightness"), cat("count_peaks"))


def _batch_sam(family, views) -> None:
    """SAM image embeddings of the planes in one encoder call, into the session's cache (``ground`` reads
    them there)."""
    import torch

    from ...model.preprocess import prepare_sam_image

    if family.caches.disk is not None:
        for v in views:
            family.sam_embedding(v, None)
        return
    missing = [v for v in views if family.caches.features.get(("sam", v.key)) is None]
    if not missing:
        return
    sam = family.model.sam
    inputs = [prepare_sam_image(v.rgb, sam.config.image_size) for v in missing]
    embeddings = sam.encode_image(torch.cat([s.pixel_values for s in inputs]))
    for j, (view, s) in enumerate(zip(missing, inputs, strict=True)):
        family.caches.features.put(("sam", view.key), (embeddings[j : j + 1], s.resize_hw, s.pad))


def _generate(family, ids: list[int], features, region_masks, region_objects, config, stop,
              suppress_first: Sequence[tuple[int, ...]] = ()):
    """Greedy (or sampled) decoding of B copies of one prompt, each on its own image: a list of
    `GenerationResult` as `MedPLIBModel.generate` returns for one, or None when cancelled.

    Rows stop at eos, a stop string or ``max_new_tokens``; finished rows are dropped from the KV cache.
    Sampling draws every row from one generator (``config.seed``), so sampled answers differ from
    per-plane ``ask`` calls with the same seed; greedy answers are the same.
    """
    import torch

    from ...model.generation import (
        GenerationResult,
        IncrementalDecoder,
        select_next_token,
        suppress,
    )

    model = family.model
    batch = features.image_tokens.shape[0]
    input_ids = torch.tensor(ids)[None].expand(batch, -1)
    prompt = model(input_ids, image_features=features, region_masks=region_masks, use_cache=True,
                   logits_positions=slice(-1, None), region_objects=region_objects)
    cache = prompt.past_key_values
    logits, hidden = prompt.logits[:, -1], prompt.hidden_states[:, -1]
    moe = [m for m in model.language_model.moe_layers() if m is not None]
    counts = _last_counts(moe, batch)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    decode = model.tokenizer.decode
    decoders = [IncrementalDecoder(decode, config.stop_strings) for _ in range(batch)]
    all_ids: list[list[int]] = [[] for _ in range(batch)]
    hiddens: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finish = ["max_new_tokens"] * batch
    active = list(range(batch))  # row b of the batch -> position in the cache
    eos = config.eos_token_id
    for index in range(config.max_new_tokens):
        if stop():
            return None
        if index == 0 and any(suppress_first):  # per row: token ids its answer may not start with
            logits = torch.stack([suppress(row, ban) if ban else row
                                  for row, ban in zip(logits, suppress_first, strict=True)])
        greedy = config.temperature < 1e-4
        chosen = logits.argmax(dim=-1).tolist() if greedy else None
        going: list[tuple[int, int, int]] = []  # (cache position, row, token)
        for j, b in enumerate(active):
            token = chosen[j] if greedy else select_next_token(logits[j], config.temperature, config.top_p, generator)
            all_ids[b].append(token)
            hiddens[b].append(hidden[j])
            if eos is not None and token == eos:
                finish[b] = "eos"
                continue
            decoders[b].push(token)
            if decoders[b].stopped:
                finish[b] = "stop_string"
                continue
            going.append((j, b, token))
        if not going or index + 1 >= config.max_new_tokens:
            break
        if len(going) < len(active):
            cache.batch_select_indices(torch.tensor([j for j, _, _ in going], device=model.device))
        active = [b for _, b, _ in going]
        embeds = model.language_model.embed_tokens(torch.tensor([[t] for _, _, t in going], device=model.device))
        out = model.language_model(embeds, past_key_values=cache, use_cache=True)
        logits, hidden = out.logits[:, -1], out.hidden_states[:, -1]
        step_counts = _last_counts(moe, len(active))
        if counts is not None and step_counts is not None:
            for j, b in enumerate(active):
                counts[b] = counts[b] + step_counts[j]
    results = []
    for b in range(batch):
        ids_b = all_ids[b][:-1] if finish[b] == "eos" else list(all_ids[b])
        result = GenerationResult(
            ids=ids_b, text=decoders[b].text().strip(), finish_reason=finish[b],
            step_hidden=torch.stack(hiddens[b]) if hiddens[b] else hidden.new_zeros((0, hidden.shape[-1])),
            expert_counts=counts[b] if counts is not None else None, all_ids=all_ids[b],
        )
        if prompt.region_empty is not None:
            result.region_empty = prompt.region_empty[b].tolist()
        results.append(result)
    return results


def _last_counts(moe_layers, rows: int):
    """Per row, [MoE layers, E] experts chosen for its last position of the call just made; None
    without MoE layers or routing records."""
    import torch

    if not moe_layers or any(m.last_routing is None for m in moe_layers):
        return None
    k = moe_layers[0].last_routing.expert_ids.shape[-1]
    chosen = torch.stack([m.last_routing.expert_ids.reshape(rows, -1, k)[:, -1] for m in moe_layers]).cpu()
    counts = torch.zeros(rows, len(moe_layers), moe_layers[0].num_experts, dtype=torch.long)
    return list(counts.scatter_add_(2, chosen.transpose(0, 1), torch.ones_like(chosen.transpose(0, 1))))
