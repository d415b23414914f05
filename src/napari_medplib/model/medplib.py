"""The assembled MedPLIB network: CLIP tower + projector, region encoder, MoE LLaMA, SEG head, SAM-Med2D.

Data flow of one question (single image):

1. ``encode_image``: CLIP pixels [1, 3, 336, 336] -> patch features [1, 576, Dv] -> image tokens [1, 576, D]
2. ``encode_regions``: 24x24 region grids [R, 24, 24] + patch features -> region tokens [R, D]
3. ``build_inputs_embeds``: ids with -200 / -300 -> the expanded sequence (576 image tokens at -200,
   one region token per -300, in order) of length ``len(ids) - 1 + 576`` (one image, regions 1:1)
4. ``language_model``: MoE LLaMA -> final-norm hidden states, float32 logits, routing
5. ``generate``: KV-cached decoding; one mask per ``<SEG>``: the hidden state that predicted it ->
   ``text_hidden_fcs`` -> SAM-Med2D mask decoder -> postprocess (``reference`` or ``corrected``).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX, MedPLIBConfig
from .counter import ObjectCounter
from .generation import GenerationConfig, GenerationResult, generate_tokens
from .llm import LanguageModelOutput, MedPLIBLanguageModel
from .region_encoder import RegionEncoder, frame_levels
from .seg_prompts import SegRegionPrompt, decode_seg_with_regions, pair_with_segs
from .vision import CLIPVisionTower, build_mm_projector

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class ImageFeatures:
    patch_features: torch.Tensor  # [B, P, Dv] CLIP hidden_states[-2] without CLS
    image_tokens: torch.Tensor  # [B, P, D] mm_projector output
    #: [B, S, S] grey level of the CLIP frame, NaN in the padding (`preprocess.frame_brightness`); read
    #: by version-3 region geometry only, so None elsewhere
    brightness: torch.Tensor | None = None
    #: [B, K, 84, 84] bool object centres per count noun (`counter.ObjectCounter.peaks`); None without a counter
    count_peaks: torch.Tensor | None = None
    _levels: dict = field(default_factory=dict, repr=False, compare=False)

    def brightness_levels(self, index: int) -> torch.Tensor | None:
        """Image ``index``'s sorted grey levels (`region_encoder.frame_levels`), sorted once per image and
        kept with the features, which the engine caches: later questions about the image skip the sort."""
        if self.brightness is None:
            return None
        if index not in self._levels:
            self._levels[index] = frame_levels(self.brightness[index])
        return self._levels[index]


@dataclass
class MedPLIBOutput:
    logits: torch.Tensor | None  # [B, L', V] float32
    hidden_states: torch.Tensor  # [B, L, D] final-norm hidden states
    past_key_values: object | None
    routing: list  # per layer RoutingRecord | None
    position_map: torch.Tensor  # [B, N] expanded position of every input id (the first, for -200)
    attention_mask: torch.Tensor  # [B, L] of the expanded sequence
    image_features: ImageFeatures | None = None
    region_features: list[torch.Tensor] | None = None  # per sequence [R_b, D]
    region_empty: list[torch.Tensor] | None = None  # per sequence [R_b] bool (region covered no cell)


@dataclass
class PrefixCache:
    """KV cache of a prompt prefix (system prompt + image), reusable for every question on that image."""

    input_ids: torch.Tensor  # [N_p] prefix ids (with -200), on the CPU
    past_key_values: object  # transformers DynamicCache; copied before each use
    image_features: ImageFeatures | None

    @property
    def length(self) -> int:
        return self.past_key_values.get_seq_length()


@dataclass
class GroundingResult:
    prompt_embeddings: torch.Tensor  # [N, out_dim] text_hidden_fcs output
    low_res_logits: torch.Tensor  # [N, 1, 64, 64]
    iou_predictions: torch.Tensor  # [N, 1]
    mask_logits: torch.Tensor  # [N, H, W] float32
    masks: torch.Tensor  # [N, H, W] bool


class MedPLIBModel(nn.Module):
    def __init__(self, config: MedPLIBConfig, tokenizer=None, sam: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config)
        self.mm_projector = build_mm_projector(config)
        self.region_encoder = RegionEncoder(config) if config.region_fea_adapter else None
        self.counter = ObjectCounter(config) if config.count_nouns else None
        self.language_model = MedPLIBLanguageModel(config)
        self.text_hidden_fcs = nn.Sequential(  # LISA's T-projector: D -> D -> out_dim
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_size, config.out_dim),
            nn.Dropout(0.0),
        )
        self.sam = sam
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: MedPLIBConfig, tokenizer=None, sam: nn.Module | None = None, seed: int | None = 0):
        """Randomly initialised model (tests, training from scratch); eval mode, routers in fp32."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config, tokenizer, sam).eval()

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = torch.float32,
        load_sam: bool = True,
    ) -> MedPLIBModel:
        """Load a local checkpoint folder (released layout, or ours from ``convert.py``)."""
        from .checkpoint import empty_parameters, load_checkpoint_state, load_into
        from .tokenizer import MedPLIBTokenizer

        dtype = resolve_dtype(dtype)
        config = MedPLIBConfig.from_pretrained(folder)
        tokenizer = MedPLIBTokenizer.from_pretrained(folder)
        if len(tokenizer) != config.vocab_size:
            from .config import CheckpointError

            raise CheckpointError(
                f"the tokenizer in {folder} has {len(tokenizer)} tokens but config.json says vocab_size="
                f"{config.vocab_size}; tokenizer files and weights come from different models"
            )
        state, sam_state, origin, weight_map = load_checkpoint_state(folder, config, dtype, device)
        with empty_parameters():
            model = cls(config, tokenizer)
        load_into(model, state, origin, weight_map)
        if load_sam and sam_state:
            from .config import CheckpointError
            from .sam import SamCheckpointError, load_sam_med2d

            try:
                model.sam = load_sam_med2d(sam_state, dtype=dtype, device=device)
            except SamCheckpointError as err:
                raise CheckpointError(f"{folder}: the model.visual_model.* (SAM-Med2D) weights: {err}") from None
        return model.to(device).eval()

    def cast(self, dtype: torch.dtype | str) -> MedPLIBModel:
        """Cast all weights to ``dtype``, keeping the MoE routers in float32 (as the reference computes)."""
        self.to(resolve_dtype(dtype))
        for moe in self.language_model.moe_layers():
            if moe is not None:
                moe.router.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    # ------------------------------------------------------------------ encoders
    def encode_image(self, clip_pixel_values: torch.Tensor, brightness: torch.Tensor | None = None) -> ImageFeatures:
        """[B, 3, 336, 336] CLIP-normalised pixels -> patch features and projected image tokens.

        The CLIP tower is frozen (no gradients), as in the reference; the projector is not. ``brightness``
        ([B, 336, 336], `preprocess.frame_brightness`) is kept for models whose regions read it."""
        with torch.no_grad():
            patch_features = self.vision_tower(clip_pixel_values.to(self.device))  # [B, P, Dv]
        peaks = self.count_peaks(clip_pixel_values)
        return ImageFeatures(patch_features, self.image_tokens(patch_features, peaks), brightness, peaks)

    def count_peaks(self, clip_pixel_values: torch.Tensor) -> torch.Tensor | None:
        """[B, 3, 336, 336] -> [B, K, 84, 84] bool object centres (``model.counter``); None without a counter."""
        if self.counter is None:
            return None
        with torch.no_grad():
            return self.counter.peaks(clip_pixel_values.to(self.device))

    def image_tokens(self, patch_features: torch.Tensor, count_peaks: torch.Tensor | None = None) -> torch.Tensor:
        """What fills the ``<image>`` slot: projected patch features [B, P, D], each plus the image's count
        vector when the model counts (``count_peaks`` from `count_peaks`; ``model.counter``)."""
        image_tokens = self.mm_projector(patch_features.to(self.dtype))  # [B, P, D]
        if self.counter is None:
            return image_tokens
        if count_peaks is None:
            raise ValueError("this model counts objects (config.count_nouns): give the image's count_peaks")
        bias = self.counter.image_bias(count_peaks.sum(dim=(-2, -1)))  # [B, D]
        return image_tokens + bias[:, None].to(image_tokens.dtype)

    @property
    def regions_read_brightness(self) -> bool:
        """Whether region tokens read the frame's brightness and a box's object (region geometry version 3)."""
        encoder = self.region_encoder
        return encoder is not None and encoder.geometry is not None and encoder.geometry_version >= 3

    def encode_regions(
        self, patch_features: torch.Tensor, region_masks: torch.Tensor, generator: torch.Generator | None = None,
        object_masks: torch.Tensor | None = None, brightness: torch.Tensor | None = None,
        levels: torch.Tensor | None = None, count_peaks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's patch features [P, Dv] + masks [R, 24, 24] (cell grids) or [R, 336, 336] (CLIP frame)
        -> (tokens [R, D], empty [R] bool); see `RegionEncoder` (``object_masks``, ``brightness``, ``levels``:
        version 3). ``count_peaks`` [K, 84, 84] (the image's, `count_peaks`): frame masks also carry the
        objects counted inside them (``model.counter``)."""
        if self.region_encoder is None:
            raise ValueError("this model has no region_fea_adapter (config.region_fea_adapter is false)")
        device = patch_features.device
        masks = torch.as_tensor(region_masks, device=device)
        objects = torch.as_tensor(object_masks, device=device) if object_masks is not None else None
        tokens, empty = self.region_encoder(patch_features, masks, generator, objects, brightness, levels)
        if self.counter is not None and count_peaks is not None and masks.shape[-1] > count_peaks.shape[-1]:
            counted = self.counter.region_bias(self.counter.region_counts(masks, count_peaks))  # [R, D]
            tokens = tokens + (counted * ~empty[:, None].to(device)).to(tokens.dtype)
        return tokens, empty

    def seg_prompt_embeddings(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] hidden states that predicted ``<SEG>`` -> [N, out_dim] SAM prompt tokens."""
        return self.text_hidden_fcs(seg_hidden.to(self.dtype))

    # ------------------------------------------------------------------ embeddings
    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        region_tokens: Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, N] with -200/-300 -> (embeds [B, L, D], attention mask [B, L], position map [B, N]).

        The k-th -200 of the batch takes ``image_tokens[k]``; the j-th -300 of sequence b takes
        ``region_tokens[b][j]``. Sequences are right-padded with zeros (mask 0), as the reference does.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        embed = self.language_model.embed_tokens
        sequences, position_maps = [], []
        image_index = 0
        for b, (ids, valid) in enumerate(zip(input_ids, attention_mask.bool().to(self.device), strict=True)):
            ids = ids[valid]
            text = embed(ids.clamp_min(0))  # [N_b, D]
            slots = (ids < 0).nonzero().flatten().tolist()
            regions = list(region_tokens[b]) if region_tokens is not None and b < len(region_tokens) else []
            n_regions = sum(int(ids[s]) == REGION_TOKEN_INDEX for s in slots)
            if n_regions != len(regions):
                raise ValueError(f"sequence {b} has {n_regions} region slot(s) (-300) but {len(regions)} region token(s)")
            pieces, start, region_index = [], 0, 0
            position_map = torch.empty(len(ids), dtype=torch.long)
            length = 0
            for slot in [*slots, len(ids)]:
                pieces.append(text[start:slot])
                position_map[start:slot] = torch.arange(length, length + slot - start)
                length += slot - start
                if slot == len(ids):
                    break
                if int(ids[slot]) == IMAGE_TOKEN_INDEX:
                    if image_tokens is None or image_index >= image_tokens.shape[0]:
                        raise ValueError("the prompt has an <image> slot (-200) but no image features were given")
                    vision = image_tokens[image_index].to(text.dtype)
                    image_index += 1
                elif int(ids[slot]) == REGION_TOKEN_INDEX:
                    vision = regions[region_index].reshape(1, -1).to(text.dtype)
                    region_index += 1
                else:
                    raise ValueError(f"unknown placeholder id {int(ids[slot])} in input_ids")
                pieces.append(vision)
                position_map[slot] = length
                length += vision.shape[0]
                start = slot + 1
            sequences.append(torch.cat(pieces))
            position_maps.append(position_map)
        max_len = max(s.shape[0] for s in sequences)
        embeds = sequences[0].new_zeros((len(sequences), max_len, sequences[0].shape[-1]))
        mask = torch.zeros((len(sequences), max_len), dtype=torch.bool, device=self.device)
        pos = torch.full(tuple(input_ids.shape), -1, dtype=torch.long)
        for b, (seq, pmap) in enumerate(zip(sequences, position_maps, strict=True)):
            embeds[b, : seq.shape[0]] = seq
            mask[b, : seq.shape[0]] = True
            pos[b, : pmap.shape[0]] = pmap
        return embeds, mask, pos

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        clip_pixel_values: torch.Tensor | None = None,
        region_masks: Sequence[torch.Tensor] | None = None,
        image_features: ImageFeatures | None = None,
        region_features: Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_positions: torch.Tensor | slice | None = None,
        region_generator: torch.Generator | None = None,
        region_objects: Sequence[torch.Tensor | None] | None = None,
    ) -> MedPLIBOutput:
        """Prompt forward. ``region_masks[b]``: [R_b, 24, 24] grids or [R_b, 336, 336] frame masks for sequence b's image;
        ``region_features`` (precomputed [R_b, D]) take precedence. ``region_objects[b]``: [R_b, 336, 336]
        the object each region stands for (version-3 region geometry; None = the regions themselves)."""
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        needs_image = bool((input_ids == IMAGE_TOKEN_INDEX).any())
        if needs_image and image_features is None:
            if clip_pixel_values is None:
                raise ValueError("input_ids contain an <image> slot (-200): give clip_pixel_values or image_features")
            image_features = self.encode_image(clip_pixel_values)
        region_empty = None
        if region_features is None and region_masks is not None:
            if image_features is None:
                raise ValueError("region masks need the image: give clip_pixel_values or image_features")
            brightness, peaks = image_features.brightness, image_features.count_peaks
            encoded = [self.encode_regions(image_features.patch_features[b], m, region_generator,
                                           region_objects[b] if region_objects is not None else None,
                                           brightness[b] if brightness is not None else None,
                                           levels=image_features.brightness_levels(b) if brightness is not None else None,
                                           count_peaks=peaks[b] if peaks is not None else None)
                       for b, m in enumerate(region_masks)]
            region_features = [tokens for tokens, _ in encoded]
            region_empty = [empty for _, empty in encoded]
        image_tokens = image_features.image_tokens if image_features is not None else None
        embeds, mask, position_map = self.build_inputs_embeds(input_ids, image_tokens, region_features, attention_mask)
        if past_key_values is not None:
            past = past_key_values.get_seq_length()
            mask = torch.cat([torch.ones((mask.shape[0], past), dtype=torch.bool, device=mask.device), mask], dim=1)
        out: LanguageModelOutput = self.language_model(
            embeds, attention_mask=mask, past_key_values=past_key_values, use_cache=use_cache,
            logits_positions=logits_positions,
        )
        return MedPLIBOutput(
            out.logits, out.hidden_states, out.past_key_values, out.routing, position_map, mask,
            image_features, list(region_features) if region_features is not None else None, region_empty,
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, clip_pixel_values: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> PrefixCache:
        """Run a prompt prefix once (e.g. everything up to ``<im_end>``) and keep its KV cache."""
        out = self(input_ids, clip_pixel_values, image_features=image_features, use_cache=True,
                   logits_positions=slice(-1, None))
        return PrefixCache(input_ids.flatten().cpu(), out.past_key_values, out.image_features)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        clip_pixel_values: torch.Tensor | None = None,
        region_masks: Sequence[torch.Tensor] | None = None,
        image_features: ImageFeatures | None = None,
        region_features: Sequence[torch.Tensor] | None = None,
        config: GenerationConfig | None = None,
        stream: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | threading.Event | None = None,
        return_step_logits: bool = False,
        prefix: PrefixCache | None = None,
        region_objects: Sequence[torch.Tensor | None] | None = None,
        **generation_kwargs,
    ) -> GenerationResult:
        """Answer one prompt (batch 1). ``generation_kwargs`` fill a ``GenerationConfig``.

        With ``prefix`` (from ``prefill``), ``input_ids`` must start with the prefix ids; only the rest
        is run (the prefix cache is copied, so it can be reused)."""
        if config is None:
            generation_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
            config = GenerationConfig(**generation_kwargs)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate() answers one prompt at a time, got a batch of {input_ids.shape[0]}")
        cache = None
        if prefix is not None:
            n_prefix = prefix.input_ids.numel()
            if input_ids.shape[1] <= n_prefix or not torch.equal(input_ids[0, :n_prefix].cpu(), prefix.input_ids):
                raise ValueError("the prompt does not start with the cached prefix's ids; build a new prefix")
            input_ids, clip_pixel_values = input_ids[:, n_prefix:], None
            image_features = image_features if image_features is not None else prefix.image_features
            cache = copy.deepcopy(prefix.past_key_values)
        prompt = self(
            input_ids, clip_pixel_values, region_masks, image_features, region_features,
            past_key_values=cache, use_cache=True, logits_positions=slice(-1, None), region_objects=region_objects,
        )
        cache = prompt.past_key_values
        moe_layers = [m for m in self.language_model.moe_layers() if m is not None]

        def step(token: int) -> tuple[torch.Tensor, torch.Tensor]:
            embeds = self.language_model.embed_tokens(torch.tensor([[token]], device=self.device))
            out = self.language_model(embeds, past_key_values=cache, use_cache=True)
            return out.logits[0, -1], out.hidden_states[0, -1]

        def last_position_counts() -> torch.Tensor | None:
            """[MoE layers, E] experts chosen for the position just computed (one device sync)."""
            if not moe_layers or any(m.last_routing is None for m in moe_layers):
                return None
            chosen = torch.stack([m.last_routing.expert_ids[-1] for m in moe_layers]).cpu()  # [layers, k]
            counts = torch.zeros(len(moe_layers), moe_layers[0].num_experts, dtype=torch.long)
            return counts.scatter_add_(1, chosen, torch.ones_like(chosen))

        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: " ".join(map(str, ids)))
        result = generate_tokens(
            step, prompt.logits[0, -1], prompt.hidden_states[0, -1], decode, config,
            stream=stream, should_stop=should_stop, routing_counts=last_position_counts,
            return_step_logits=return_step_logits,
        )
        if prompt.region_empty is not None:
            result.region_empty = prompt.region_empty[0].tolist()
        return result

    # ------------------------------------------------------------------ grounding
    @staticmethod
    def seg_hidden_positions(
        input_ids: torch.Tensor, position_map: torch.Tensor, seg_token_id: int, rule: str = "each"
    ) -> list[int]:
        """Expanded positions of the hidden states used for the ``<SEG>`` tokens in ``input_ids`` [N].

        ``rule="each"``: the state just before every ``<SEG>`` (the one that predicts it; one mask per
        ``<SEG>``). ``rule="reference"``: MedPLIB ``evaluate()`` at 9c3efe9 on a teacher-forced
        sequence: exactly one ``<SEG>`` -> the second-to-last position; several -> before the first.
        """
        ids, pmap = input_ids.flatten(), position_map.flatten()
        positions = [int(pmap[i]) - 1 for i in (ids == seg_token_id).nonzero().flatten().tolist()]
        if rule == "each":
            return positions
        if rule != "reference":
            raise ValueError(f"rule must be 'each' or 'reference', got {rule!r}")
        if len(positions) == 1:
            return [int(pmap[pmap >= 0].max()) - 1]
        return positions[:1]

    def answer_seg_hidden(self, result: GenerationResult) -> torch.Tensor:
        """[n_seg, D] hidden states that predicted each ``<SEG>`` of a generated answer."""
        indices = result.seg_indices(self.tokenizer.seg_token_id)
        return result.step_hidden[indices]

    def decode_seg(
        self,
        image_embeddings: torch.Tensor,
        seg_prompts: torch.Tensor,
        seg_regions: Sequence[SegRegionPrompt | None],
        original_hw: tuple[int, int],
        resize_hw: tuple[int, int],
        pad: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM decoding of T-projected ``<SEG>`` prompts [N, out_dim] -> low-res logits (N, 1, 64, 64), iou.

        ``seg_regions`` (one per prompt, see ``pair_with_segs``) join as box/point prompts only when the
        model was trained with them (``config.seg_region_prompts``); otherwise MedPLIB's text-only path.
        The one place this choice is made: grounding, the engine and training all call it.
        """
        if self.config.seg_region_prompts and any(r is not None for r in seg_regions):
            return decode_seg_with_regions(self.sam, image_embeddings, seg_prompts, seg_regions, original_hw,
                                           resize_hw, pad)
        return self.sam.decode_with_text_prompt(image_embeddings, seg_prompts)

    #: Probability above which a pixel is part of a clicked object's region (``point_object_logits``): the
    #: pixels SAM finds more likely object than not. The reference's 0.1 for masks shown to users also takes
    #: in rims of touching neighbours; measured on region VQA (100 held-out images, seed 1), 0.740 at 0.1 and
    #: 0.745 at 0.5, within noise, so the cautious core is used.
    POINT_OBJECT_THRESHOLD = 0.5

    @property
    def point_regions_are_objects(self) -> bool:
        """Whether a point ``<region>`` stands for SAM's mask of the clicked object (``config.point_region_mask``)."""
        return self.config.point_region_mask == "object" and self.sam is not None

    @torch.no_grad()
    def point_object_logits(self, image_embeddings: torch.Tensor, points_xy: torch.Tensor) -> torch.Tensor:
        """Low-res logits (N, 1, 64, 64) of the object under each point, (N, 2) (x, y) in SAM's padded frame.

        Why: MedPLIB makes a clicked point the (2*span+1)^2 square around it, which on a 256-px field of
        nuclei also covers two or three neighbours and the background between them, so the region token
        cannot say which object was clicked, nor its size or shape. With ``point_region_mask = "object"``
        the point is first a SAM prompt (one positive point, as ``Session.segment`` uses it) and its mask
        is the region; callers upsample these logits as they upsample every SAM mask, keep the pixels above
        ``POINT_OBJECT_THRESHOLD`` and fall back to the square where none is. The engine, evaluation and
        training all call this.
        """
        labels = torch.ones((points_xy.shape[0], 1), dtype=torch.int64)
        low_res, _ = self.sam.decode_with_prompts(image_embeddings, points=points_xy.reshape(-1, 1, 2),
                                                  point_labels=labels)
        return low_res

    @torch.no_grad()
    def box_object_logits(self, image_embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Low-res logits (N, 1, 64, 64) of the object in each box, (N, 4) xyxy in SAM's padded frame: the
        object a box ``<region>`` stands for in version-3 region geometry (``regions_read_brightness``).
        Callers upsample them like every SAM mask, keep the pixels above ``POINT_OBJECT_THRESHOLD`` and
        inside the box (``engine.prompts.keep_inside_box``), and fall back to the box where none is."""
        low_res, _ = self.sam.decode_with_prompts(image_embeddings, boxes=boxes_xyxy.reshape(-1, 4))
        return low_res

    @torch.no_grad()
    def ground(
        self,
        seg_hidden: torch.Tensor,
        sam_pixel_values: torch.Tensor | None = None,
        resize_hw: tuple[int, int] | None = None,
        original_hw: tuple[int, int] | None = None,
        image_embeddings: torch.Tensor | None = None,
        mode: str = "corrected",
        pad: tuple[int, int] | None = None,
        threshold: float = 0.1,
        regions: Sequence[SegRegionPrompt | None] | None = None,
    ) -> GroundingResult:
        """One mask per row of ``seg_hidden`` [N, D] on one image (SAM pixels or cached embeddings).

        ``regions``: the question's regions in order (``SegRegionPrompt``), paired with the ``<SEG>`` s by
        ``pair_with_segs``; used only by models trained with ``config.seg_region_prompts``.
        """
        from .postprocess import masks_from_logits, postprocess_masks

        if self.sam is None:
            raise ValueError("this model has no SAM-Med2D mask decoder loaded (load_sam=False or no visual_model.* weights)")
        if resize_hw is None or original_hw is None:
            raise ValueError("grounding needs resize_hw (SAM resize) and original_hw (image size)")
        if image_embeddings is None:
            if sam_pixel_values is None:
                raise ValueError("give sam_pixel_values or precomputed image_embeddings")
            image_embeddings = self.sam.encode_image(sam_pixel_values)
        prompts = self.seg_prompt_embeddings(seg_hidden.reshape(-1, seg_hidden.shape[-1]))  # [N, out_dim]
        if pad is None:  # as postprocess_masks derives it
            size = self.sam.config.image_size
            pad = ((size - resize_hw[0]) // 2, (size - resize_hw[1]) // 2)
        paired = pair_with_segs(prompts.shape[0], list(regions or ()))
        low_res, iou = self.decode_seg(image_embeddings, prompts, paired, original_hw, resize_hw, pad)
        mask_logits = postprocess_masks(low_res, resize_hw, original_hw, pad=pad, mode=mode)
        return GroundingResult(prompts, low_res, iou, mask_logits, masks_from_logits(mask_logits, threshold))
