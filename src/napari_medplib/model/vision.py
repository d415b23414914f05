"""CLIP vision tower (penultimate-layer patch tokens) and the ``mm_projector`` (LLaVA-1.5).

The tower is transformers' ``CLIPVisionModel`` built from the CLIP config only; its weights come
from the MedPLIB checkpoint (``model.vision_tower.vision_tower.vision_model.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MedPLIBConfig


class CLIPVisionTower(nn.Module):
    """pixel_values [B, 3, 336, 336] -> patch features [B, 576, Dv] (``hidden_states[select_layer]``,
    before ``post_layernorm``, CLS dropped)."""

    def __init__(self, config: MedPLIBConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vision_config = CLIPVisionConfig(**config.vision_config)
        vision_config._attn_implementation = "sdpa"
        self.clip = CLIPVisionModel(vision_config)
        self.select_layer = config.mm_vision_select_layer
        self.select_feature = config.mm_vision_select_feature

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.clip(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.select_layer]  # [B, 1 + P, Dv]
        if self.select_feature == "patch":
            features = features[:, 1:]
        return features  # [B, P, Dv]


def build_mm_projector(config: MedPLIBConfig) -> nn.Module:
    """``mlp2x_gelu``: Linear(Dv, D) -> GELU (erf) -> Linear(D, D); ``linear``: Linear(Dv, D)."""
    if config.mm_projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    return nn.Sequential(
        nn.Linear(config.mm_hidden_size, config.hidden_size),
        nn.GELU(),
        nn.Linear(config.hidden_size, config.hidden_size),
    )
