"""`MedMoEFamily`: Med-MoE through the family interface (text answers, expert shares reported)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..text import TextFamily


class MedMoEFamily(TextFamily):
    """A loaded ``MedMoEModel``; its ``generate`` returns ``(text, ids, ExpertChoices)``."""

    def expert_shares(self, result: tuple) -> tuple[list[list[float]] | None, list[float] | None]:
        """Share of answer tokens per routed expert (first choice), per MoE layer and averaged."""
        if len(result) < 3:
            return None, None
        choices: Any = result[2]
        try:
            experts = np.asarray(choices.answer_experts)[..., 0]  # [n_moe, T']
            width = int(max(choices.num_experts))
        except (AttributeError, IndexError, ValueError, TypeError):
            return None, None
        if experts.size == 0:
            return None, None
        shares = [(np.bincount(row, minlength=width) / max(len(row), 1)).tolist() for row in experts]
        return shares, np.mean(np.asarray(shares), axis=0).tolist()
