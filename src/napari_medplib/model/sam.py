"""SAM-Med2D as MedPLIB uses it: image encoder, prompt encoder, mask decoder, reference weight loading.

* Image encoder: :mod:`napari_medplib.model.sam_encoder` (transformers' SAM ViT parts + adapters).
* Prompt encoder: ``SamMed2DPromptEncoder`` subclasses transformers' ``SamPromptEncoder``. Its point and
  box embedding code is used as is; we add the reference's *text* prompt (the ``<SEG>`` embedding,
  appended as one more sparse token after points and boxes), an explicit prompt batch size, and the
  dense positional grid (``get_dense_pe``). Positional encodings are computed in float32 whatever the
  model dtype, as the reference does.
* Mask decoder: transformers' ``SamMaskDecoder`` unchanged (LayerNorm eps set to the reference's 1e-5).
  Every prompt set gets its own copy of the image embedding (batch N, one prompt set per row), which is
  what the reference decoder does with its broadcast ``src + dense``.

Coordinates for :meth:`SamMed2D.decode_with_prompts` are SAM's: (x, y) in the *padded* 256 input frame
(centre padding included). Convert image pixels with ``preprocess.image_to_sam_coords`` /
``image_to_sam_boxes``.

Weights: :func:`load_sam_med2d` takes the reference state dict with ``model.visual_model.`` stripped
(``image_encoder.blocks.0.attn.qkv.weight`` ...), infers the dimensions, maps the names and loads strictly.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch
from torch import nn
from transformers.models.sam.configuration_sam import SamConfig
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPositionalEmbedding, SamPromptEncoder

from .sam_encoder import SamMed2DConfig, SamMed2DImageEncoder

__all__ = [
    "SamCheckpointError",
    "SamMed2D",
    "SamMed2DConfig",
    "infer_sam_config",
    "load_sam_med2d",
    "reference_key_to_ours",
    "our_key_to_reference",
]

# Reference buffers that are not weights (non-persistent in the reference, tolerated if present).
_IGNORED_REFERENCE_KEYS = {"pixel_mean", "pixel_std"}


class SamCheckpointError(ValueError):
    """The SAM-Med2D weights do not fit the model (missing, unexpected or mis-shaped tensors)."""


# ============================================================================ prompt encoder


class _Fp32PositionalEmbedding(SamPositionalEmbedding):
    """Random-Fourier positional encoding evaluated in float32 (the reference casts to float32 too)."""

    def forward(self, input_coords: torch.Tensor, input_shape=None) -> torch.Tensor:
        coords = input_coords.to(torch.float32).clone()  # (..., 2) as (x, y)
        if input_shape is not None:
            coords[..., 0] = coords[..., 0] / input_shape[1]
            coords[..., 1] = coords[..., 1] / input_shape[0]
        coords = (2 * coords - 1) @ self.positional_embedding.to(torch.float32)
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., C) float32


class SamMed2DPromptEncoder(SamPromptEncoder):
    """transformers' prompt encoder plus the reference's text-embedding prompt and dense PE grid."""

    def __init__(self, config: SamConfig):
        super().__init__(config)
        self.shared_embedding = _Fp32PositionalEmbedding(config.vision_config)

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
        """Sparse tokens (N, 1, T, C) in the reference order points, boxes, text; dense (N, C, 16, 16)."""
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
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, grid_h, grid_w)
        return sparse, dense


# ============================================================================ full model


class SamMed2D(nn.Module):
    """SAM-Med2D: ``image_encoder`` -> (``prompt_encoder``) -> ``mask_decoder``."""

    def __init__(self, config: SamMed2DConfig):
        super().__init__()
        self.config = config
        sam_config = SamConfig(
            vision_config=config.vision_config().to_dict(),
            prompt_encoder_config=config.prompt_encoder_config().to_dict(),
            mask_decoder_config=config.mask_decoder_config().to_dict(),
        )
        sam_config.vision_config._attn_implementation = config.attn_implementation
        sam_config.prompt_encoder_config._attn_implementation = config.attn_implementation
        self.image_encoder = SamMed2DImageEncoder(config)
        self.prompt_encoder = SamMed2DPromptEncoder(sam_config)
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config())

    @classmethod
    def from_config(cls, config: SamMed2DConfig) -> "SamMed2D":
        """Randomly initialised model (tests, training from SAM-Med2D-shaped scratch)."""
        model = cls(config)
        with torch.no_grad():
            # The reference draws the Fourier matrix from N(0, 1); transformers scales it by hidden/2.
            model.prompt_encoder.shared_embedding.positional_embedding.normal_(0.0, 1.0)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.image_encoder.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.image_encoder.pos_embed.device

    # ------------------------------------------------------------------ image

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) SAM-normalised, padded pixels -> image embeddings (B, 256, 16, 16)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"SAM pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "use preprocess.prepare_sam_image()"
            )
        return self.image_encoder(pixel_values.to(device=self.device, dtype=self.dtype))

    # ------------------------------------------------------------------ decoding

    def _decode(
        self,
        image_embeddings: torch.Tensor,
        batch_size: int,
        multimask_output: bool,
        **prompts,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.config.image_embedding_size
        expected = (self.config.prompt_embed_dim, grid, grid)
        if image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != expected:
            raise ValueError(f"image_embeddings must be (1 or N, {expected}), got {tuple(image_embeddings.shape)}")
        if image_embeddings.shape[0] not in (1, batch_size):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]} but there are {batch_size} prompt sets; "
                "pass one image embedding (shared) or one per prompt set"
            )
        image_embeddings = image_embeddings.to(device=self.device, dtype=self.dtype)
        image_embeddings = image_embeddings.expand(batch_size, -1, -1, -1)  # (N, C, 16, 16)
        sparse, dense = self.prompt_encoder.embed(batch_size, **prompts)
        image_pe = self.prompt_encoder.get_dense_pe().to(self.dtype).expand(batch_size, -1, -1, -1)
        outputs = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(self.dtype),
            multimask_output=multimask_output,
        )
        low_res_logits, iou = outputs[0], outputs[1]  # (N, 1, K, 64, 64), (N, 1, K)
        return low_res_logits[:, 0], iou[:, 0]

    def decode_with_text_prompt(
        self, image_embeddings: torch.Tensor, prompt_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference grounding path: each (256,) ``<SEG>`` prompt is one sparse token, dense prompt is
        ``no_mask_embed``, single-mask output (slot 0).

        image_embeddings (1, 256, 16, 16); prompt_embedding (N, 256) -> logits (N, 1, 64, 64), iou (N, 1).
        """
        if prompt_embedding.ndim == 1:
            prompt_embedding = prompt_embedding[None]
        if prompt_embedding.ndim != 2 or prompt_embedding.shape[1] != self.config.prompt_embed_dim:
            raise ValueError(
                f"prompt_embedding must be (N, {self.config.prompt_embed_dim}), got {tuple(prompt_embedding.shape)}"
            )
        text = prompt_embedding.to(device=self.device, dtype=self.dtype)[:, None]  # (N, 1, C)
        return self._decode(image_embeddings, text.shape[0], False, text_embeds=text)

    def decode_with_prompts(
        self,
        image_embeddings: torch.Tensor,
        points=None,
        point_labels=None,
        boxes=None,
        mask_inputs=None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard SAM prompting (no LLM). Coordinates are (x, y) in the padded 256 input frame.

        points (N, P, 2) with point_labels (N, P) (1 foreground, 0 background); boxes (N, 4) xyxy;
        mask_inputs (N, 1, 64, 64) low-res logits from a previous pass. Returns logits (N, K, 64, 64) and
        iou (N, K) with K = 1, or 3 when ``multimask_output`` (SAM's slots 1..3).
        """
        as_tensor = lambda x, dtype: None if x is None else torch.as_tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        points = as_tensor(points, torch.float32)
        point_labels = as_tensor(point_labels, torch.int64)
        boxes = as_tensor(boxes, torch.float32)
        mask_inputs = as_tensor(mask_inputs, self.dtype)
        sizes = set()
        if points is not None:
            if point_labels is None:
                raise ValueError("points need point_labels (1 foreground, 0 background) of shape (N, P)")
            if points.ndim != 3 or points.shape[-1] != 2 or tuple(point_labels.shape) != tuple(points.shape[:2]):
                raise ValueError(
                    f"points must be (N, P, 2) xy and point_labels (N, P), got {tuple(points.shape)} "
                    f"and {tuple(point_labels.shape)}"
                )
            sizes.add(points.shape[0])
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be (N, 4) as x0, y0, x1, y1, got {tuple(boxes.shape)}")
            sizes.add(boxes.shape[0])
        low_res = self.config.low_res_mask_size
        if mask_inputs is not None:
            if mask_inputs.ndim != 4 or tuple(mask_inputs.shape[1:]) != (1, low_res, low_res):
                raise ValueError(f"mask_inputs must be (N, 1, {low_res}, {low_res}), got {tuple(mask_inputs.shape)}")
            sizes.add(mask_inputs.shape[0])
        if len(sizes) > 1:
            raise ValueError(f"points, boxes and mask_inputs disagree on the number of prompt sets: {sorted(sizes)}")
        batch_size = sizes.pop() if sizes else 1
        return self._decode(
            image_embeddings,
            batch_size,
            multimask_output,
            points=points,
            point_labels=point_labels,
            boxes=boxes,
            mask_inputs=mask_inputs,
        )


# ============================================================================ weights: names


_SIMPLE_RENAMES = [  # (reference regex, ours), applied in order
    (r"^image_encoder\.patch_embed\.proj\.", "image_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"image_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.(\d+)\.Adapter\.", r"image_encoder.layers.\1.adapter."),
    (r"^image_encoder\.blocks\.(\d+)\.", r"image_encoder.layers.\1."),
    (r"^image_encoder\.neck\.0\.", "image_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "image_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "image_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "image_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "prompt_encoder.shared_embedding.positional_embedding"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_MLP_REFERENCE = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$")
_MLP_OURS = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\.(.+)$")


def _mlp_depth(prefix: str, config: SamMed2DConfig) -> int:
    return config.iou_head_depth if prefix.endswith("iou_prediction_head") else 3


def reference_key_to_ours(key: str, config: SamMed2DConfig) -> str:
    """Reference SAM-Med2D parameter name -> our module's name (MLP heads need the config's depths)."""
    match = _MLP_REFERENCE.match(key)
    if match:  # reference MLP layers.0..d-1 -> proj_in, layers.0..d-3, proj_out
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        depth = _mlp_depth(prefix, config)
        name = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        return f"{prefix}.{name}.{rest}"
    for pattern, replacement in _SIMPLE_RENAMES:
        new_key, n = re.subn(pattern, replacement, key)
        if n:
            return new_key
    return key


def our_key_to_reference(key: str, config: SamMed2DConfig) -> str:
    """Inverse of :func:`reference_key_to_ours` (for error messages and export)."""
    match = _MLP_OURS.match(key)
    if match:
        prefix, name, middle, rest = match.groups()
        depth = _mlp_depth(prefix, config)
        index = 0 if name == "proj_in" else depth - 1 if name == "proj_out" else int(middle) + 1
        return f"{prefix}.layers.{index}.{rest}"
    inverse = [
        (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
        (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
        (r"^image_encoder\.layers\.(\d+)\.adapter\.", r"image_encoder.blocks.\1.Adapter."),
        (r"^image_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
        (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
        (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
        (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
        (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
        (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
         "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
        (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
        (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
        (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
        (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
        (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
        (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
        (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
        (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
        (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
        (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    ]
    for pattern, replacement in inverse:
        new_key, n = re.subn(pattern, replacement, key)
        if n:
            return new_key
    return key


# ============================================================================ weights: dims and loading


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def infer_sam_config(state_dict: Mapping[str, torch.Tensor], **overrides) -> SamMed2DConfig:
    """Read SAM-Med2D's dimensions from reference-named weights (``model.visual_model.`` stripped).

    Depth from the block count, width/patch from the patch embedding, image size from ``pos_embed``,
    heads from the relative-position width (head_dim), global blocks from rel-pos length 2*grid-1,
    window from the other blocks' rel-pos length, decoder/prompt sizes from their tensors.
    The decoder's head count is not in the weights; it defaults to the reference's 8.
    """
    try:
        patch = state_dict["image_encoder.patch_embed.proj.weight"]  # (C, 3, p, p)
        pos_embed = state_dict["image_encoder.pos_embed"]  # (1, g, g, C)
        embed_dim, patch_size, grid = patch.shape[0], patch.shape[2], pos_embed.shape[1]
        depth = _count(state_dict, r"^image_encoder\.blocks\.(\d+)\.")
        rel_rows = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
        head_dim = state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        global_blocks = tuple(i for i, rows in enumerate(rel_rows) if rows == 2 * grid - 1)
        window_rows = {rows for rows in rel_rows if rows != 2 * grid - 1}
        if len(window_rows) > 1:
            raise SamCheckpointError(f"SAM image encoder blocks have inconsistent rel_pos sizes {sorted(window_rows)}")
        window_size = (window_rows.pop() + 1) // 2 if window_rows else 0
        adapter = state_dict.get("image_encoder.blocks.0.Adapter.channel.0.weight")
        config = SamMed2DConfig(
            image_size=grid * patch_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // head_dim,
            mlp_ratio=state_dict["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
            window_size=window_size,
            global_attn_indexes=global_blocks,
            adapter_hidden=None if adapter is None else adapter.shape[0],
            out_chans=state_dict["image_encoder.neck.0.weight"].shape[0],
            prompt_embed_dim=state_dict["prompt_encoder.no_mask_embed.weight"].shape[1],
            mask_in_chans=state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            num_point_embeddings=_count(state_dict, r"^prompt_encoder\.point_embeddings\.(\d+)\."),
            decoder_depth=_count(state_dict, r"^mask_decoder\.transformer\.layers\.(\d+)\."),
            decoder_mlp_dim=state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample_rate=(
                state_dict["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"].shape[1]
                // state_dict["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"].shape[0]
            ),
            num_multimask_outputs=state_dict["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(state_dict, r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            iou_head_hidden_dim=state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
    except KeyError as error:
        raise SamCheckpointError(
            f"not a SAM-Med2D state dict: tensor {error.args[0]!r} is missing (keys must be the reference's "
            "names with the 'model.visual_model.' prefix stripped, e.g. 'image_encoder.blocks.0.attn.qkv.weight')"
        ) from None
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _listing(title: str, names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"{title} ({len(names)}): {shown}"


def load_sam_med2d(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    config: SamMed2DConfig | None = None,
    device: torch.device | str | None = None,
) -> SamMed2D:
    """Build SAM-Med2D from reference-named weights (``model.visual_model.`` stripped), strictly.

    Raises :class:`SamCheckpointError` listing missing, unexpected and mis-shaped tensors (reference
    names). The model is built on the meta device and takes the given tensors, so nothing is
    initialised twice; ``dtype``/``device`` cast afterwards. Returned in eval mode.
    """
    config = config or infer_sam_config(state_dict)
    with torch.device("meta"):
        model = SamMed2D(config)
    expected = {our_key_to_reference(k, config): (k, tuple(v.shape)) for k, v in model.state_dict().items()}
    provided = {k: v for k, v in state_dict.items() if k not in _IGNORED_REFERENCE_KEYS}
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(provided[k].shape)} (model wants {expected[k][1]})"
        for k in set(expected) & set(provided)
        if tuple(provided[k].shape) != expected[k][1]
    )
    if missing or unexpected or mismatched:
        problems = [
            _listing(title, names)
            for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if names
        ]
        raise SamCheckpointError("SAM-Med2D weights do not fit the model: " + "; ".join(problems))
    ours = {expected[k][0]: v for k, v in provided.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
