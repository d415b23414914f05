"""SAM-Med2D as MedPLIB uses it: image encoder, prompt encoder, mask decoder, weight loading.

* Image encoder: :mod:`.sam_encoder` (transformers' SAM ViT parts + SAM-Med2D adapters).
* Prompt encoder and mask decoder: :mod:`.sam_decoder` (transformers' modules; text prompt added).
  Every prompt set gets its own copy of the image embedding (batch N, one prompt set per row), which
  is what the reference decoder does with its broadcast ``src + dense``.

Coordinates for :meth:`SamMed2D.decode_with_prompts` are SAM's: (x, y) in the *padded* 256 input
frame (centre padding included). Convert image pixels with ``preprocess.image_to_sam_coords`` /
``preprocess.image_to_sam_boxes``.

Weights: :func:`load_sam_med2d` takes the reference state dict with ``model.visual_model.`` stripped
(``image_encoder.blocks.0.attn.qkv.weight`` ...), infers the dimensions, maps the names and loads
strictly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .sam_decoder import SamMed2DPromptEncoder, build_mask_decoder
from .sam_encoder import SamMed2DConfig, SamMed2DImageEncoder

__all__ = [
    "SamCheckpointError",
    "SamMed2D",
    "SamMed2DConfig",
    "infer_sam_config",
    "load_sam_med2d",
    "our_key_to_reference",
    "reference_key_to_ours",
]

# Reference buffers that are not weights (non-persistent in the reference, tolerated if present).
_IGNORED_REFERENCE_KEYS = {"pixel_mean", "pixel_std"}


class SamCheckpointError(ValueError):
    """The SAM-Med2D weights do not fit the model (missing, unexpected or mis-shaped tensors)."""


# ============================================================================ full model


class SamMed2D(nn.Module):
    """SAM-Med2D: ``image_encoder`` -> (``prompt_encoder``) -> ``mask_decoder``."""

    def __init__(self, config: SamMed2DConfig):
        super().__init__()
        self.config = config
        self.image_encoder = SamMed2DImageEncoder(config)
        self.prompt_encoder = SamMed2DPromptEncoder(config)
        self.mask_decoder = build_mask_decoder(config)

    @classmethod
    def from_config(cls, config: SamMed2DConfig) -> SamMed2D:
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
            raise ValueError(
                f"image_embeddings must be (1 or N, {expected}), got {tuple(image_embeddings.shape)}"
            )
        if image_embeddings.shape[0] not in (1, batch_size):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]} but there are {batch_size} "
                "prompt sets; pass one image embedding (shared) or one per prompt set"
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
        self,
        image_embeddings: torch.Tensor,
        prompt_embedding: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference grounding path: each (256,) ``<SEG>`` prompt is one sparse token, dense prompt is
        ``no_mask_embed``, single-mask output (slot 0).

        image_embeddings (1, 256, 16, 16), prompt_embedding (N, 256)
        -> low-res logits (N, 1, 64, 64), iou (N, 1).
        ``points`` (N, P, 2) + ``point_labels`` (N, P) or ``boxes`` (N, 4), in the padded input frame,
        are added before the text token (our ``seg_region_prompts`` extension; see ``seg_prompts``).
        """
        if prompt_embedding.ndim == 1:
            prompt_embedding = prompt_embedding[None]
        if prompt_embedding.ndim != 2 or prompt_embedding.shape[1] != self.config.prompt_embed_dim:
            raise ValueError(
                f"prompt_embedding must be (N, {self.config.prompt_embed_dim}), "
                f"got {tuple(prompt_embedding.shape)}"
            )
        text = prompt_embedding.to(device=self.device, dtype=self.dtype)[:, None]  # (N, 1, C)
        if (points is None) != (point_labels is None):
            raise ValueError("give points and point_labels together")
        for name, value, shape in (("points", points, (text.shape[0], None, 2)), ("boxes", boxes, (text.shape[0], 4))):
            if value is not None and (value.ndim != len(shape) or any(
                    want is not None and got != want for got, want in zip(value.shape, shape, strict=False))):
                raise ValueError(f"{name} must be {tuple('P' if w is None else w for w in shape)}, got {tuple(value.shape)}")
        return self._decode(image_embeddings, text.shape[0], False, text_embeds=text,
                            points=points, point_labels=point_labels, boxes=boxes)

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
        mask_inputs (N, 1, 64, 64) low-res logits from a previous pass. Returns logits
        (N, K, 64, 64) and iou (N, K) with K = 1, or 3 when ``multimask_output`` (SAM's slots 1..3).
        """
        def tensor(value, dtype):
            return None if value is None else torch.as_tensor(value, dtype=dtype, device=self.device)

        prompts = {
            "points": tensor(points, torch.float32),
            "point_labels": tensor(point_labels, torch.int64),
            "boxes": tensor(boxes, torch.float32),
            "mask_inputs": tensor(mask_inputs, self.dtype),
        }
        batch_size = _prompt_batch_size(**prompts, low_res=self.config.low_res_mask_size)
        return self._decode(image_embeddings, batch_size, multimask_output, **prompts)


def _prompt_batch_size(points, point_labels, boxes, mask_inputs, low_res: int) -> int:
    """Check the standard prompts' shapes; return their common number of prompt sets N."""
    sizes = set()
    if points is not None:
        if point_labels is None:
            raise ValueError("points need point_labels (1 foreground, 0 background) of shape (N, P)")
        if points.ndim != 3 or points.shape[-1] != 2 or point_labels.shape != points.shape[:2]:
            raise ValueError(
                f"points must be (N, P, 2) xy and point_labels (N, P), got {tuple(points.shape)} "
                f"and {tuple(point_labels.shape)}"
            )
        sizes.add(points.shape[0])
    if boxes is not None:
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4) as x0, y0, x1, y1, got {tuple(boxes.shape)}")
        sizes.add(boxes.shape[0])
    if mask_inputs is not None:
        if mask_inputs.ndim != 4 or tuple(mask_inputs.shape[1:]) != (1, low_res, low_res):
            raise ValueError(
                f"mask_inputs must be (N, 1, {low_res}, {low_res}), got {tuple(mask_inputs.shape)}"
            )
        sizes.add(mask_inputs.shape[0])
    if len(sizes) > 1:
        raise ValueError(
            f"points, boxes and mask_inputs disagree on the number of prompt sets: {sorted(sizes)}"
        )
    return sizes.pop() if sizes else 1


# ============================================================================ weights: names


# (reference prefix, our prefix); {i} and {j} stand for block / layer numbers. First match wins.
_RENAMES = [
    ("image_encoder.patch_embed.proj.", "image_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{i}.norm{j}.", "image_encoder.layers.{i}.layer_norm{j}."),
    ("image_encoder.blocks.{i}.Adapter.", "image_encoder.layers.{i}.adapter."),
    ("image_encoder.blocks.{i}.", "image_encoder.layers.{i}."),
    ("image_encoder.neck.0.", "image_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "image_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "image_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "image_encoder.neck.layer_norm2."),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{i}.norm{j}.", "mask_decoder.transformer.layers.{i}.layer_norm{j}."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + pattern)


_TO_OURS = [(_template_regex(ref), ours) for ref, ours in _RENAMES]
_TO_REFERENCE = [(_template_regex(ours), ref) for ref, ours in _RENAMES]

# SAM's MLP heads: reference layers.0..d-1 <-> transformers' proj_in, layers.0..d-3, proj_out
_HEAD = r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
_HEAD_REFERENCE = re.compile(_HEAD + r"layers\.(\d+)\.(.+)$")
_HEAD_OURS = re.compile(_HEAD + r"(proj_in|proj_out|layers\.(\d+))\.(.+)$")


def _head_depth(prefix: str, config: SamMed2DConfig) -> int:
    return config.iou_head_depth if prefix.endswith("iou_prediction_head") else 3


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for regex, template in table:
        match = regex.match(key)
        if match:
            return template.format(**match.groupdict()) + key[match.end() :]
    return key


def reference_key_to_ours(key: str, config: SamMed2DConfig) -> str:
    """Reference SAM-Med2D parameter name -> our module's name (MLP heads need the config)."""
    match = _HEAD_REFERENCE.match(key)
    if match:
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        last = _head_depth(prefix, config) - 1
        name = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
        return f"{prefix}.{name}.{rest}"
    return _rename(key, _TO_OURS)


def our_key_to_reference(key: str, config: SamMed2DConfig) -> str:
    """Inverse of :func:`reference_key_to_ours` (error messages, export to the reference layout)."""
    match = _HEAD_OURS.match(key)
    if match:
        prefix, name, middle, rest = match.groups()
        last = _head_depth(prefix, config) - 1
        index = 0 if name == "proj_in" else last if name == "proj_out" else int(middle) + 1
        return f"{prefix}.layers.{index}.{rest}"
    return _rename(key, _TO_REFERENCE)


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
        rel_pos = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
        head_dim = rel_pos[0].shape[1]
        global_blocks = tuple(i for i, table in enumerate(rel_pos) if len(table) == 2 * grid - 1)
        window_rows = {len(table) for table in rel_pos if len(table) != 2 * grid - 1}
        if len(window_rows) > 1:
            raise SamCheckpointError(
                f"SAM image encoder blocks have inconsistent rel_pos sizes {sorted(window_rows)}"
            )
        window_size = (window_rows.pop() + 1) // 2 if window_rows else 0
        adapter = state_dict.get("image_encoder.blocks.0.Adapter.channel.0.weight")
        final_q = state_dict["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"]
        iou_head = state_dict["mask_decoder.iou_prediction_head.layers.0.weight"]
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
            attention_downsample_rate=final_q.shape[1] // final_q.shape[0],
            num_multimask_outputs=state_dict["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(state_dict, r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            iou_head_hidden_dim=iou_head.shape[0],
        )
    except KeyError as error:
        raise SamCheckpointError(
            f"not a SAM-Med2D state dict: tensor {error.args[0]!r} is missing (keys must be the "
            "reference's names with the 'model.visual_model.' prefix stripped, e.g. "
            "'image_encoder.blocks.0.attn.qkv.weight')"
        ) from None
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _listing(title: str, names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
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
    expected = {  # reference name -> (our name, shape)
        our_key_to_reference(k, config): (k, tuple(v.shape)) for k, v in model.state_dict().items()
    }
    provided = {k: v for k, v in state_dict.items() if k not in _IGNORED_REFERENCE_KEYS}
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(provided[k].shape)} (model wants {expected[k][1]})"
        for k in set(expected) & set(provided)
        if tuple(provided[k].shape) != expected[k][1]
    )
    if missing or unexpected or mismatched:
        groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        problems = [_listing(title, names) for title, names in groups if names]
        raise SamCheckpointError("SAM-Med2D weights do not fit the model: " + "; ".join(problems))
    ours = {expected[k][0]: v for k, v in provided.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
