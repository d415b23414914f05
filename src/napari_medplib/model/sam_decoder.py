"""SAM-Med2D prompt encoder and mask decoder, on transformers' SAM modules.

* ``SamMed2DPromptEncoder`` subclasses transformers' ``SamPromptEncoder``: its point and box code is
  used as is. Added: the reference's *text* prompt (MedPLIB feeds the ``<SEG>`` embedding as one more
  sparse token, after points and boxes), an explicit prompt batch size, and the dense positional grid
  ``get_dense_pe``. Positional encodings are evaluated in float32 whatever the model dtype, as the
  reference does (``_Fp32PositionalEmbedding``).
* The mask decoder is transformers' ``SamMaskDecoder`` unchanged, built by :func:`build_mask_decoder`
  with the reference's LayerNorm eps (1e-5 in the two-way transformer).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.sam.configuration_sam import SamConfig
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPromptEncoder,
)

from .sam_encoder import SamMed2DConfig


class _Fp32PositionalEmbedding(SamPositionalEmbedding):
    """Random-Fourier positional encoding computed in float32 (the reference casts to float32)."""

    def forward(self, input_coords: torch.Tensor, input_shape=None) -> torch.Tensor:
        coords = input_coords.to(torch.float32).clone()  # (..., 2) as (x, y)
        if input_shape is not None:
            coords[..., 0] = coords[..., 0] / input_shape[1]
            coords[..., 1] = coords[..., 1] / input_shape[0]
        coords = (2 * coords - 1) @ self.positional_embedding.to(torch.float32)
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., C) float32


class SamMed2DPromptEncoder(SamPromptEncoder):
    """transformers' prompt encoder plus the text-embedding prompt and the dense PE grid."""

    def __init__(self, config: SamMed2DConfig):
        sam_config = SamConfig(
            vision_config=config.vision_config().to_dict(),
            prompt_encoder_config=config.prompt_encoder_config().to_dict(),
        )
        super().__init__(sam_config)
        self.shared_embedding = _Fp32PositionalEmbedding(sam_config.vision_config)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every embedding cell centre: (1, C, 16, 16) float32."""
        grid_h, grid_w = self.image_embedding_size
        device = self.shared_embedding.positional_embedding.device
        ones = torch.ones((grid_h, grid_w), device=device, dtype=torch.float32)
        y_embed = (ones.cumsum(dim=0) - 0.5) / grid_h
        x_embed = (ones.cumsum(dim=1) - 0.5) / grid_w
        pe = self.shared_embedding(torch.stack([x_embed, y_embed], dim=-1))  # (16, 16, C)
        return pe.permute(2, 0, 1).unsqueeze(0)

    def embed(
        self,
        batch_size: int,
        points: torch.Tensor | None = None,  # (N, P, 2) xy in the padded input frame
        point_labels: torch.Tensor | None = None,  # (N, P): 1 fg, 0 bg, -1 padding
        boxes: torch.Tensor | None = None,  # (N, 4) xyxy
        mask_inputs: torch.Tensor | None = None,  # (N, 1, 64, 64) logits
        text_embeds: torch.Tensor | None = None,  # (N, T, C)
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Sparse tokens (N, 1, T, C) in the reference order points, boxes, text (None if there are
        none) and dense embeddings (N, C, 16, 16)."""
        pieces = []
        if points is not None:
            pad = boxes is None  # SAM appends a padding point when there is no box
            pieces.append(self._embed_points(points[:, None], point_labels[:, None], pad=pad)[:, 0])
        if boxes is not None:
            pieces.append(self._embed_boxes(boxes[:, None])[:, 0])  # (N, 2, C)
        if text_embeds is not None:
            pieces.append(text_embeds)
        sparse = None
        if pieces:
            dtype = self.no_mask_embed.weight.dtype
            sparse = torch.cat([p.to(dtype) for p in pieces], dim=1)[:, None]  # (N, 1, T, C)
        if mask_inputs is not None:
            dense = self.mask_embed(mask_inputs)
        else:
            grid_h, grid_w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense = dense.expand(batch_size, -1, grid_h, grid_w)
        return sparse, dense


def build_mask_decoder(config: SamMed2DConfig) -> SamMaskDecoder:
    """transformers' ``SamMaskDecoder`` with SAM-Med2D's sizes."""
    return SamMaskDecoder(config.mask_decoder_config())
