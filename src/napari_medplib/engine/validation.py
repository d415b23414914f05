"""Checks of what a caller hands the engine, and of what a model folder declares, before any work.

Session inputs (each raises :class:`SessionInputError` with a one-line message and the fix):

* :func:`check_image` - an image with no pixels (a 0-size plane or a 0-size crop);
* :func:`check_contrast_limits` - contrast limits must be finite and not reversed (``low <= high``),
  one pair or one pair per channel;
* :func:`check_temperature` - the sampling temperature must be a finite number >= 0.

Model folders: :func:`check_model_config` compares the sizes a ``config.json`` declares with
:data:`CONFIG_LIMITS` before a single module is built: a 2 KB config declaring 100,000 decoder
layers would otherwise build 100,000 layers (gigabytes of module objects, even on the meta
device). The limits are far above every LLaMA/LLaVA/CLIP model published (LLaMA-3 405B: 126 layers,
hidden 16,384, vocabulary 128,256).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import SessionInputError

#: Largest value accepted for each size field of config.json (and of its ``vision_config``).
CONFIG_LIMITS: dict[str, int] = {
    "num_hidden_layers": 256,
    "hidden_size": 65_536,
    "intermediate_size": 262_144,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "vocab_size": 1_048_576,
    "max_position_embeddings": 1_048_576,
    "mm_hidden_size": 65_536,
    "max_sample_point": 1_000_000,
    "out_dim": 65_536,
    "count_max": 1_000_000,
    "count_width": 4_096,
    "image_size": 4_096,
    "patch_size": 1_024,
    "projection_dim": 65_536,
}
#: Largest number of experts per MoE layer, and of entries in the MoE lists.
MAX_EXPERTS = 1_024


def check_image(image: Any) -> None:
    """Refuse an image without pixels (any axis of size 0)."""
    shape = np.shape(image)
    if len(shape) >= 2 and 0 in shape:
        raise SessionInputError(
            f"the image has shape {tuple(shape)}, which holds no pixels; pass a plane of at least 1 x 1 pixels"
        )


def check_contrast_limits(contrast_limits: Any) -> None:
    """Refuse NaN/infinite or reversed contrast limits (None = automatic contrast, accepted)."""
    if contrast_limits is None:
        return
    try:
        limits = np.asarray(contrast_limits, dtype=np.float64)
    except (TypeError, ValueError):
        raise SessionInputError(
            f"contrast_limits must be numbers (low, high), got {contrast_limits!r}"
        ) from None
    if limits.shape[-1:] != (2,) or limits.ndim not in (1, 2):
        raise SessionInputError(
            f"contrast_limits must be one (low, high) pair or one pair per channel, got shape {limits.shape}"
        )
    if not np.isfinite(limits).all():
        raise SessionInputError(
            f"contrast_limits must be finite numbers, got {limits.tolist()}; reset the layer's contrast"
        )
    pairs = limits.reshape(-1, 2)
    bad = np.flatnonzero(pairs[:, 0] > pairs[:, 1])  # equal: a threshold, allowed
    if bad.size:
        low, high = pairs[bad[0]]
        raise SessionInputError(
            f"contrast_limits must go from low to high, got ({low:g}, {high:g}); give (low, high) with low <= high"
        )


def check_temperature(temperature: Any) -> float:
    """The temperature as a float; refuses NaN, infinity, negatives and non-numbers."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise SessionInputError(f"temperature must be a number >= 0, got {temperature!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SessionInputError(
            f"temperature must be a finite number >= 0 (0 = always the most likely word), got {temperature!r}"
        )
    return value


def config_problems(config: Mapping[str, Any], where: str = "config.json") -> list[str]:
    """What in a config.json dict is beyond :data:`CONFIG_LIMITS` or not a whole number where one is needed."""
    problems = []
    for section, values in ((where, config), (f"{where} vision_config", config.get("vision_config"))):
        if not isinstance(values, Mapping):
            continue
        for key, limit in CONFIG_LIMITS.items():
            if key not in values:
                continue
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                problems.append(f"{section} {key} = {value!r} is not a number")
            elif not float(value).is_integer() or not 0 <= value <= limit:
                problems.append(f"{section} {key} = {value!r} is outside 0..{limit:,}")
    moe = config.get("moe")
    if isinstance(moe, Mapping):
        for key in ("moe_layers_idx", "num_experts"):
            entries = moe.get(key)
            if isinstance(entries, list) and len(entries) > MAX_EXPERTS:
                problems.append(f"{where} moe.{key} has {len(entries):,} entries (at most {MAX_EXPERTS:,})")
            elif isinstance(entries, list) and any(
                isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_EXPERTS for v in entries
            ):
                problems.append(f"{where} moe.{key} holds values that are not whole numbers in 0..{MAX_EXPERTS:,}")
            elif isinstance(entries, int | float) and not (0 <= entries <= MAX_EXPERTS):
                problems.append(f"{where} moe.{key} = {entries!r} is outside 0..{MAX_EXPERTS:,}")
    return problems


def check_model_config(config: Any, where: str = "config.json") -> None:
    """Raise ``CheckpointError`` when a config.json dict declares sizes beyond :data:`CONFIG_LIMITS`."""
    from ..model.config import CheckpointError

    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where} must hold a JSON object, not a {type(config).__name__}")
    problems = config_problems(config, where)
    if problems:
        raise CheckpointError(
            f"{where} declares a model this program will not build: {'; '.join(problems[:5])}. "
            "The file is damaged or not a MedPLIB config; download the model folder again"
        )
