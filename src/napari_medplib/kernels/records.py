"""What a mixture-of-experts router decided, shared by the PyTorch MoE (``model.moe``) and the kernels.

It lives here, below both, so that the kernels never import the model package (``model.moe`` calls
``kernels.dispatch`` on CUDA; the kernels return this record).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingRecord:
    """What the router decided for every token of one call (flattened batch*sequence order)."""

    router_logits: torch.Tensor  # [S, E] float32
    expert_ids: torch.Tensor  # [S, k] int64, first column = argmax
    gate_probs: torch.Tensor  # [S, k] float32, softmax probability of each chosen expert
    combine_weights: torch.Tensor  # [S, k] float32, factor applied to each expert output (0 if dropped)
    dropped: torch.Tensor | None = None  # [S, k] bool, capacity drops (training, or eval_drop_tokens)
    aux_loss: torch.Tensor | None = None  # GShard load-balancing loss (training, coef > 0)

    def expert_counts(self, num_experts: int) -> torch.Tensor:
        """Tokens per expert (first choice), [E] int64."""
        return torch.bincount(self.expert_ids[:, 0].cpu(), minlength=num_experts)
