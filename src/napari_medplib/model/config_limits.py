"""The largest sizes a model folder's ``config.json`` may declare, and what in a config exceeds them.

Compared before a single module is built: a 2 KB config declaring 100,000 decoder layers would
otherwise build 100,000 layers (gigabytes of module objects, even on the meta device). The limits are
far above every LLaMA/LLaVA/CLIP model published (LLaMA-3 405B: 126 layers, hidden 16,384, vocabulary
128,256). ``config.check_model_config`` raises on them; ``engine.validation`` re-exports both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
