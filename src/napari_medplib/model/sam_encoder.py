"""SAM-Med2D image encoder: SAM's ViT with an adapter in every block, 256 px input.

Built from ``transformers.models.sam.modeling_sam`` parts: ``SamPatchEmbeddings``, ``SamVisionAttention``
(windowed/global attention with decomposed relative positions, via ``SamVisionLayer``) and
``SamVisionNeck`` are used as they are. What transformers cannot express is written here:

* ``SamMed2DAdapter`` - SAM-Med2D's ``Adapter_Layer``: channel attention (avg-pool -> Linear -> ReLU ->
  Linear -> sigmoid, no biases) scales the features, a spatial branch (3x3 stride-2 conv -> ReLU ->
  4x4 stride-2 transposed conv -> ReLU, no biases) is added back as a residual, then LayerNorm
  (eps 1e-5, PyTorch's default, unlike the ViT's 1e-6 norms).
* ``SamMed2DVisionLayer`` - subclasses ``SamVisionLayer``; its forward adds the adapter in parallel to
  the MLP on the same normalised input: ``x = x + mlp(norm2(x)) + adapter(norm2(x))``.
* ``SamMed2DImageEncoder`` - a plain ``nn.Module`` in place of ``SamVisionEncoder`` (a PreTrainedModel
  whose constructor would build adapter-less layers and run transformers' weight init).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.sam.configuration_sam import (
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.sam.modeling_sam import SamPatchEmbeddings, SamVisionLayer, SamVisionNeck


@dataclass
class SamMed2DConfig:
    """Dimensions of SAM-Med2D. Defaults are the released ViT-B (the reference hard-codes them);
    :func:`napari_medplib.model.sam.infer_sam_config` reads them from weights instead."""

    # image encoder
    image_size: int = 256
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    adapter_hidden: int | None = 192  # embed_dim // 4; None = plain SAM blocks without adapters
    out_chans: int = 256
    layer_norm_eps: float = 1e-6
    # prompt encoder
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    num_point_embeddings: int = 4
    # mask decoder (TwoWayTransformer + heads)
    decoder_depth: int = 2
    decoder_num_heads: int = 8  # not recoverable from weights; the reference always uses 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # runtime
    attn_implementation: str = "sdpa"  # "sdpa" or "eager" for the transformers attention modules

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid (16 for 256 px / patch 16)."""
        return self.image_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding grid: 64)."""
        return 4 * self.image_embedding_size

    def vision_config(self) -> SamVisionConfig:
        config = SamVisionConfig(
            hidden_size=self.embed_dim,
            output_channels=self.out_chans,
            num_hidden_layers=self.depth,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            layer_norm_eps=self.layer_norm_eps,
            qkv_bias=True,
            mlp_ratio=self.mlp_ratio,
            mlp_dim=int(self.embed_dim * self.mlp_ratio),
            use_abs_pos=True,
            use_rel_pos=True,
            window_size=self.window_size,
            global_attn_indexes=list(self.global_attn_indexes),
            num_pos_feats=self.prompt_embed_dim // 2,
        )
        config._attn_implementation = self.attn_implementation
        return config

    def prompt_encoder_config(self) -> SamPromptEncoderConfig:
        config = SamPromptEncoderConfig(
            hidden_size=self.prompt_embed_dim,
            image_size=self.image_size,
            patch_size=self.patch_size,
            mask_input_channels=self.mask_in_chans,
            num_point_embeddings=self.num_point_embeddings,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        )
        config._attn_implementation = self.attn_implementation
        return config

    def mask_decoder_config(self) -> SamMaskDecoderConfig:
        config = SamMaskDecoderConfig(
            hidden_size=self.prompt_embed_dim,
            hidden_act="relu",
            mlp_dim=self.decoder_mlp_dim,
            num_hidden_layers=self.decoder_depth,
            num_attention_heads=self.decoder_num_heads,
            attention_downsample_rate=self.attention_downsample_rate,
            num_multimask_outputs=self.num_multimask_outputs,
            iou_head_depth=self.iou_head_depth,
            iou_head_hidden_dim=self.iou_head_hidden_dim,
            layer_norm_eps=1e-5,  # the reference's TwoWayTransformer uses nn.LayerNorm defaults
        )
        config._attn_implementation = self.attn_implementation
        return config


class SamMed2DAdapter(nn.Module):
    """SAM-Med2D ``Adapter_Layer``: channel gate, spatial residual, LayerNorm. (B, H, W, C) in and out."""

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5 as in the reference
        self.channel = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim, bias=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, embed_dim, bias=False),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(embed_dim, embed_dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = hidden_states.permute(0, 3, 1, 2)  # (B, C, H, W)
        batch, channels = features.shape[:2]
        gate = self.channel(F.adaptive_avg_pool2d(features, 1).view(batch, channels))  # (B, C)
        gated = gate.view(batch, channels, 1, 1) * features
        features = features + self.spatial(gated)  # (B, C, H, W); H, W even
        return self.norm(features.permute(0, 2, 3, 1))  # (B, H, W, C)


class SamMed2DVisionLayer(SamVisionLayer):
    """``SamVisionLayer`` with SAM-Med2D's adapter next to the MLP (same normalised input)."""

    def __init__(self, config: SamVisionConfig, window_size: int, adapter_hidden: int | None):
        super().__init__(config, window_size)
        self.adapter = SamMed2DAdapter(config.hidden_size, adapter_hidden) if adapter_hidden else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, padding_shape = self.window_partition(hidden_states, self.window_size)
        hidden_states, _ = self.attn(hidden_states=hidden_states)
        if self.window_size > 0:
            hidden_states = self.window_unpartition(hidden_states, self.window_size, padding_shape, (height, width))
        hidden_states = residual + hidden_states

        normed = self.layer_norm2(hidden_states)
        hidden_states = hidden_states + self.mlp(normed)
        if self.adapter is not None:
            hidden_states = hidden_states + self.adapter(normed)
        return hidden_states


class SamMed2DImageEncoder(nn.Module):
    """Patch embed + absolute positions -> adapter ViT blocks -> neck. (B, 3, 256, 256) -> (B, 256, 16, 16)."""

    def __init__(self, config: SamMed2DConfig):
        super().__init__()
        vision_config = config.vision_config()
        grid = config.image_embedding_size
        self.patch_embed = SamPatchEmbeddings(vision_config)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.layers = nn.ModuleList(
            SamMed2DVisionLayer(
                vision_config,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                adapter_hidden=config.adapter_hidden,
            )
            for i in range(config.depth)
        )
        self.neck = SamVisionNeck(vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.patch_embed(pixel_values) + self.pos_embed  # (B, 16, 16, C)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.neck(hidden_states)  # (B, out_chans, 16, 16)
