"""Llama3-Med: a CLIP tower seen through multi-scale (S2) encoding, an MLP connector, and Llama-3.

Data flow for one image and one prompt (paper sizes in brackets: DFN5B ViT-H/14-378, scales
378/756/1134, Llama-3-8B-Instruct)::

    image (H, W[, 3]) uint8
      -> prepare_image: shortest edge to S, centre crop, normalise        [1, 3, S, S]     (S = 1134)
      -> Llama3MedVisionTower: multiscale_encode over the scales
           per scale: bicubic resize, n x n tiles, CLIP hidden_states[-2] without CLS,
           stitch, area-pool to the base grid; concatenate channels       [1, g*g, K*Dv]   ([1, 729, 3840])
      -> Llama3MedConnector: Linear, GELU, Linear                         [1, g*g, D]      ([1, 729, 4096])
      -> spliced in place of the -200 id of the prompt ids                [1, L, D]
      -> LlamaForCausalLM (transformers) with a KV cache                  [1, L, V]

Weights load from a folder in the reference's full fine-tune layout: ``language_model.*``
(``LlamaForCausalLM`` naming), ``vision_tower._vision_tower.vision_model.*`` (HF CLIP naming),
``connector._connector.{0,2}.*``. Nothing is downloaded; no remote code is run.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...model.generation import IncrementalDecoder, select_next_token
from .config import (
    IMAGE_TOKEN_INDEX,
    S2_FEATURE_LAYER,
    Llama3MedCheckpointError,
    Llama3MedConfig,
)
from .multiscale import MultiScaleOutput, multiscale_encode, tokens_to_map
from .processing import (
    ImageInput,
    ImageSettings,
    Llama3MedTokenizer,
    build_llama3_prompt,
    preprocess_image,
    read_image_settings,
)

__all__ = ["Llama3MedModel", "Llama3MedOutput", "Llama3MedGeneration", "load"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def llama_config(config: Llama3MedConfig):
    """transformers ``LlamaConfig`` with every value explicit (SDPA attention, as the reference ran)."""
    from transformers import LlamaConfig

    t = config.text
    rope = {"rope_type": "default"}
    if t.get("rope_scaling"):
        rope = dict(t["rope_scaling"])
        rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = float(t["rope_theta"])
    llama = LlamaConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        hidden_act=t["hidden_act"],
        max_position_embeddings=t["max_position_embeddings"],
        rms_norm_eps=t["rms_norm_eps"],
        rope_parameters=rope,
        attention_bias=t["attention_bias"],
        mlp_bias=t["mlp_bias"],
        tie_word_embeddings=t["tie_word_embeddings"],
        bos_token_id=t["bos_token_id"],
        eos_token_id=t["eos_token_id"],
        pad_token_id=t["pad_token_id"],
    )
    llama._attn_implementation = "sdpa"
    return llama


def clip_vision_config(config: Llama3MedConfig):
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(**config.vision)
    vision._attn_implementation = "sdpa"
    return vision


# ============================================================================ modules, in data-flow order
class Llama3MedVisionTower(nn.Module):
    """pixel_values [B, 3, S, S] -> image features [B, g*g, Dv*K] on the base grid (K scales)."""

    def __init__(self, config: Llama3MedConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.clip = CLIPVisionModel(clip_vision_config(config))
        self.scales = config.scales
        self.tile_size = config.tile_size
        self.feature_layer = S2_FEATURE_LAYER  # the reference's S2 path ignores the config's value

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """[N, 3, t, t] -> [N, Dv, g, g]: penultimate-layer patch tokens (before post_layernorm, CLS dropped)."""
        outputs = self.clip(pixel_values=tiles.to(self.dtype), output_hidden_states=True)
        tokens = outputs.hidden_states[self.feature_layer][:, 1:]  # [N, g*g, Dv]
        return tokens_to_map(tokens)

    def encode(self, pixel_values: torch.Tensor, keep_intermediates: bool = False) -> MultiScaleOutput:
        """[B, 3, S, S] -> ``MultiScaleOutput`` (features [B, Dv*K, g, g])."""
        return multiscale_encode(
            self.encode_tiles, pixel_values, self.scales, self.tile_size, keep_intermediates=keep_intermediates
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.encode(pixel_values).features  # [B, Dv*K, g, g]
        return features.flatten(2).transpose(1, 2)  # [B, g*g, Dv*K], row-major tokens


class Llama3MedConnector(nn.Module):
    """``mlp{N}x_gelu``: Linear(Dv*K, D), then (GELU, Linear(D, D)) x (N-1). [B, T, Dv*K] -> [B, T, D]."""

    def __init__(self, config: Llama3MedConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(config.vision_hidden_size, config.hidden_size)]
        for _ in range(config.connector_depth - 1):
            layers += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(image_features)


@dataclass
class Llama3MedOutput:
    logits: torch.Tensor  # [B, L', V] float32 (L' = positions asked for)
    hidden_states: torch.Tensor  # [B, L, D] after the final RMSNorm (the input of lm_head)
    past_key_values: object | None  # transformers DynamicCache when use_cache
    image_features: torch.Tensor | None = None  # [n_images, g*g, Dv*K]
    image_tokens: torch.Tensor | None = None  # [n_images, g*g, D] connector output


@dataclass
class Llama3MedGeneration:
    ids: list[int]  # new ids, without a final eos
    text: str
    finish_reason: str  # "eos" | "max_new_tokens" | "cancelled"
    step_logits: torch.Tensor | None = None  # [n, V] float32 logits that produced each sampled id


class Llama3MedModel(nn.Module):
    """The whole network plus its tokenizer and image settings; see the module docstring."""

    capabilities = {"regions": False, "masks": False, "streaming": True, "experts": False, "multiscale": True}
    family = "llama3med"

    def __init__(
        self,
        config: Llama3MedConfig,
        tokenizer: Llama3MedTokenizer | None = None,
        image_settings: ImageSettings | None = None,
    ) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.config = config
        self.tokenizer = tokenizer
        self.image_settings = image_settings or ImageSettings(size=config.image_size)
        #: End prompts as the reference's eval formatter does (a bug; see processing.py). Off by default.
        self.reference_prompt = False
        self.vision_tower = Llama3MedVisionTower(config)
        self.connector = Llama3MedConnector(config)
        self.language_model = LlamaForCausalLM(llama_config(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ------------------------------------------------------------------ inputs
    def preprocess(self, image: np.ndarray) -> ImageInput:
        """The processor output with its geometry (crop, resize) for callers that map back to the image."""
        return preprocess_image(image, self.image_settings)

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) uint8 -> pixel_values [1, 3, S, S] float32 (S = the largest scale)."""
        return self.preprocess(image).pixel_values

    def build_prompt(
        self, question: str, history: Sequence[tuple[str, str]] = (), *, reference_prompt: bool | None = None
    ) -> str:
        """The ``llama3`` template; ``reference_prompt`` (default: ``self.reference_prompt``) reproduces the
        reference's eval-prompt ending."""
        quirk = self.reference_prompt if reference_prompt is None else reference_prompt
        return build_llama3_prompt(question, history, reference_prompt=quirk)

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Prompt -> ids [1, N] with -200 where the image goes."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with load(folder)")
        return torch.tensor([self.tokenizer.encode_prompt(prompt)], dtype=torch.long)

    # ------------------------------------------------------------------ encoders
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, 3, S, S] -> (image features [n, g*g, Dv*K], image tokens [n, g*g, D]). The tower is frozen."""
        pixel_values = pixel_values.to(self.device)
        with torch.no_grad():
            features = self.vision_tower(pixel_values)
        return features, self.connector(features.to(self.dtype))

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """ids [N] with -200 placeholders + image tokens [n, T, D] -> inputs_embeds [1, N - n + n*T, D]."""
        ids = input_ids.reshape(-1).to(self.device)
        slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        n_images = 0 if image_tokens is None else image_tokens.shape[0]
        if len(slots) != n_images:
            raise ValueError(f"the prompt has {len(slots)} <image> placeholder(s) but {n_images} image(s) were given")
        embed_tokens = self.language_model.get_input_embeddings()
        pieces: list[torch.Tensor] = []
        start = 0
        for index, slot in enumerate(slots):
            pieces.append(embed_tokens(ids[start:slot]))
            pieces.append(image_tokens[index].to(self.dtype))
            start = slot + 1
        pieces.append(embed_tokens(ids[start:]))
        embeds = torch.cat(pieces)[None]  # [1, L, D]
        limit = self.config.tokenizer_model_max_length
        if embeds.shape[1] > limit:
            raise ValueError(
                f"the prompt is {embeds.shape[1]} tokens with the image, more than the model's {limit}; "
                "shorten the question or the history"
            )
        return embeds

    # ------------------------------------------------------------------ language model
    def run_language_model(
        self,
        inputs_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        last_only: bool = False,
    ) -> Llama3MedOutput:
        """Embeddings (or plain ids) -> logits [B, L|1, V] float32 and final-norm hidden states [B, L, D].

        No attention mask: the reference passes none (all positions attended, positions 0..L-1 then
        continuing after the cache)."""
        if use_cache and past_key_values is None:
            from transformers.cache_utils import DynamicCache

            past_key_values = DynamicCache(config=self.language_model.config)
        outputs = self.language_model.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            cache=past_key_values,  # ``past_key_values=`` is deprecated since transformers 5.24
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state  # [B, L, D]
        logits = self.language_model.lm_head(hidden[:, -1:] if last_only else hidden).float()
        return Llama3MedOutput(logits, hidden, past_key_values if use_cache else None)

    def forward_full(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        past_key_values=None,
        use_cache: bool = False,
        last_only: bool = False,
    ) -> Llama3MedOutput:
        """ids [N] or [1, N] (with -200) + pixel_values [n, 3, S, S] -> everything the prompt pass computes."""
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError("one sequence at a time: input_ids must be [N] or [1, N]")
        features = tokens = None
        if pixel_values is not None:
            if pixel_values.dim() == 3:
                pixel_values = pixel_values[None]
            features, tokens = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, tokens)
        out = self.run_language_model(embeds, past_key_values=past_key_values, use_cache=use_cache, last_only=last_only)
        out.image_features, out.image_tokens = features, tokens
        return out

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """ids [N] or [1, N] (with -200) + pixel_values [n, 3, S, S] -> logits [1, L, V] float32."""
        return self.forward_full(input_ids, pixel_values, **kwargs).logits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_from_ids(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | threading.Event | None = None,
        return_step_logits: bool = False,
    ) -> Llama3MedGeneration:
        """Greedy (temperature 0) or nucleus-sampled decoding with a KV cache; stops at an eos id."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        is_cancelled = should_stop.is_set if isinstance(should_stop, threading.Event) else should_stop
        decoder = IncrementalDecoder(lambda ids: self.tokenizer.decode(ids) if self.tokenizer else "")
        eos = self.eos_token_ids
        ids: list[int] = []
        step_logits: list[torch.Tensor] = []
        finish = "max_new_tokens"
        if max_new_tokens == 0:
            return Llama3MedGeneration([], "", finish)
        out = self.forward_full(input_ids, pixel_values, use_cache=True, last_only=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
        for index in range(max_new_tokens):
            if is_cancelled is not None and is_cancelled():
                finish = "cancelled"
                break
            token = select_next_token(logits, temperature, top_p, generator)
            if return_step_logits:
                step_logits.append(logits)
            if token in eos:
                finish = "eos"
                break
            ids.append(token)
            piece = decoder.push(token)
            if piece and on_text is not None:
                on_text(piece)
            if index + 1 < max_new_tokens:
                step = self.run_language_model(
                    input_ids=torch.tensor([[token]], device=self.device), past_key_values=cache, use_cache=True,
                    last_only=True,
                )
                cache, logits = step.past_key_values, step.logits[0, -1]
        tail = decoder.flush()
        if tail and on_text is not None:
            on_text(tail)
        return Llama3MedGeneration(
            ids=ids,
            text=decoder.text().strip(),
            finish_reason=finish,
            step_logits=torch.stack(step_logits) if step_logits else None,
        )

    def generate(
        self,
        image: np.ndarray,
        question: str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        *,
        history: Sequence[tuple[str, str]] = (),
        top_p: float = 1.0,
        seed: int | None = None,
        should_stop: Callable[[], bool] | threading.Event | None = None,
    ) -> tuple[str, list[int]]:
        """Answer ``question`` about ``image``: (text, new token ids). ``on_text`` gets text pieces as they
        are decoded (streaming)."""
        pixel_values = self.prepare_image(image)
        input_ids = self.tokenize(self.build_prompt(question, history))
        result = self.generate_from_ids(
            input_ids, pixel_values, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, on_text=on_text, should_stop=should_stop,
        )
        return result.text, result.ids


# ============================================================================ loading
def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise Llama3MedCheckpointError(f"{index} is not a valid shard index ({err})") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise Llama3MedCheckpointError(f"{index} names shards outside the folder: {bad[:3]}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise Llama3MedCheckpointError(
                f"{folder} is incomplete: the shard(s) {', '.join(missing)} listed in {index.name} are missing"
            )
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "connector").is_dir():
        raise Llama3MedCheckpointError(
            f"{folder} holds a pre-training stage save (connector/ only); load the fine-tuned folder, which has "
            "model.safetensors with the LLM, vision tower and connector weights"
        )
    raise Llama3MedCheckpointError(f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json")


def _read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
                    origin[key] = path.name
        except SafetensorError as err:
            raise Llama3MedCheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    return state, origin


def map_checkpoint_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Released names -> our module names (``_vision_tower`` -> ``clip``, ``_connector`` -> ``mlp``). CLIP
    keys carry ``vision_model.`` in transformers 4 and not in 5; whichever this transformers expects is
    used. Stored rotary ``inv_freq`` buffers (older saves) are dropped: they are recomputed."""
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        new = key
        if key.startswith("vision_tower._vision_tower."):
            new = "vision_tower.clip." + key[len("vision_tower._vision_tower.") :]
            if new not in expected:
                alt = new.replace("vision_tower.clip.vision_model.", "vision_tower.clip.", 1)
                new = alt if alt in expected else new
        elif key.startswith("connector._connector."):
            new = "connector.mlp." + key[len("connector._connector.") :]
        mapped[new] = tensor
    return mapped


def load(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = torch.float32
) -> Llama3MedModel:
    """Load a Llama3-Med checkpoint folder (full fine-tune layout) on ``device`` in ``dtype`` (eval mode).

    Raises ``Llama3MedCheckpointError`` naming what is missing or does not fit.
    """
    from ...model.checkpoint import empty_parameters

    folder = Path(folder)
    dtype = _resolve_dtype(dtype)
    config = Llama3MedConfig.from_folder(folder)
    base_name = config.raw.get("tokenizer_name_or_path") or config.llm_model_name_or_path
    tokenizer = Llama3MedTokenizer.from_folder(folder, folder / str(base_name) if base_name else None)
    if len(tokenizer) > config.text["vocab_size"]:
        raise Llama3MedCheckpointError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but text_config.vocab_size is "
            f"{config.text['vocab_size']}; the tokenizer and the weights come from different models"
        )
    settings = read_image_settings(folder, config.vision_model_name_or_path, config.image_size)
    state, origin = _read_state(folder)
    with empty_parameters():
        model = Llama3MedModel(config, tokenizer, settings)
    expected = model.state_dict(keep_vars=True)
    state = map_checkpoint_keys(state, set(expected))
    if config.text["tie_word_embeddings"]:
        state.pop("language_model.lm_head.weight", None)
    buffers = {name for name, _ in model.named_buffers()}
    needed = {k for k in expected if k not in buffers}
    if config.text["tie_word_embeddings"]:
        needed.discard("language_model.lm_head.weight")
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} from config.json"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{folder}: the weights do not fit the model that config.json describes:"]
        for title, items in (("wrong shape", misshaped), ("missing", missing), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        lines.append("  config.json and the weight files must come from the same Llama3-Med save.")
        raise Llama3MedCheckpointError("\n".join(lines))
    for key in state:
        if state[key].is_floating_point():
            state[key] = state[key].to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.text["tie_word_embeddings"]:
        model.language_model.lm_head.weight = model.language_model.get_input_embeddings().weight
    return model.to(device).eval()
