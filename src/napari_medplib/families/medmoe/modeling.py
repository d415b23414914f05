"""Med-MoE in PyTorch: CLIP tower -> projector -> Phi-2 / StableLM-2 decoder with domain experts + meta expert.

Data flow (B = batch, N = prompt ids with one -200 image slot, P = image patches, L = N - 1 + P):

    pixel_values [B, 3, S, S] --CLIP--> patch features [B, P, Dv] (``hidden_states[-2]``, CLS dropped)
                              --mm_projector--> image tokens [B, P, D]
    input_ids [B, N] --embed_tokens--> [B, N, D], -200 replaced by the image tokens -> [B, L, D]
        --> decoder layers (transformers' ``PhiDecoderLayer`` / ``StableLmDecoderLayer``; the ``mlp`` of
            every layer in ``moe_layers_idx`` is a :class:`MedMoESparseMoE`)
        --> final LayerNorm --> lm_head (no bias) --> logits [B, L, V] float32

The MoE layer computes what the reference's patched DeepSpeed MoE computes at inference (one rank,
``drop_tokens=False``, hard-coded capacity factor 4, so no token is ever dropped):

    router logits = x_fp32 @ W_g^T + b_g                      (fp32, the gate has a bias)
    top-1: e = argmax softmax(logits); y = p_e * Expert_e(x) + MetaExpert(x)       (p_e not renormalised)
    top-2: e1 = argmax; e2 = argmax(logits + Gumbel noise) over the others (stochastic, also at eval);
           y = (p1 E_e1(x) + p2 E_e2(x)) / (p1 + p2) + MetaExpert(x)

The meta expert is the layer's original FFN (the same module class as the dense FFN), added with weight 1.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...model.generation import GenerationConfig, GenerationResult, generate_tokens
from ...model.llm import build_attention_mask
from ...model.moe import RoutingRecord, _triton_dispatch, dispatch_combine, route_tokens
from ...model.vision import CLIPVisionTower
from .config import IMAGE_TOKEN_INDEX, MedMoEConfig, _mlp_depth
from .preprocess import ClipProcessorSettings, build_prompt, prepare_image, tokenize_prompt

__all__ = ["ExpertChoices", "MedMoEModel", "MedMoEOutput", "MedMoESparseMoE"]


def base_llm_config(config: MedMoEConfig, attn_implementation: str = "sdpa"):
    """transformers' ``PhiConfig`` / ``StableLmConfig`` for the decoder building blocks (dropout off)."""
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        partial_rotary_factor=config.partial_rotary_factor,
        rope_theta=config.rope_theta,
        qk_layernorm=config.qk_layernorm,
        attention_dropout=0.0,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=False,
    )
    if config.base == "phi":
        from transformers import PhiConfig

        llm = PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0)
    else:
        from transformers import StableLmConfig

        llm = StableLmConfig(**common, use_qkv_bias=config.use_qkv_bias, use_parallel_residual=False, hidden_dropout=0.0)
    llm._attn_implementation = attn_implementation
    return llm


# ---------------------------------------------------------------------------- MoE layer
class MedMoESparseMoE(nn.Module):
    """Replaces a decoder layer's ``mlp``: [B, L, D] -> [B, L, D] (routed experts + meta expert).

    ``router`` = ``deepspeed_moe.gate.wg`` (kept in float32), ``experts.{e}`` =
    ``deepspeed_moe.experts.deepspeed_experts.{e}``, ``meta_expert`` = ``meta_moe``. The routing of the
    last call is kept in ``last_routing`` so the model can report which expert answered.
    """

    def __init__(
        self, make_expert: Callable[[], nn.Module], hidden_size: int, num_experts: int, top_k: int,
        router_bias: bool = True, meta_expert: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=router_bias)
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))
        self.meta_expert = make_expert() if meta_expert else None
        self.last_routing: RoutingRecord | None = None
        #: Gumbel noise of the top-2 second choice; None = torch's global RNG (as the reference).
        self.generator: torch.Generator | None = None
        #: CUDA inference: routed + meta experts through the Triton expert kernels (routing stays here)
        self.use_kernels = True

    def _kernel_experts(self, tokens: torch.Tensor, expert_ids: torch.Tensor, combine: torch.Tensor):
        """Experts + meta expert via ``kernels.dispatch.routed_forward`` with this layer's routing (StableLM's
        SwiGLU or Phi-2's fc1/GELU(tanh)/fc2 experts), or None (Triton missing, training, a dtype the
        kernels lack, experts of another kind). A kernel that fails turns them off for this layer with
        a warning; the PyTorch path answers instead."""
        kernels = _triton_dispatch()
        if kernels is None or not kernels.routed_supports(self, tokens):
            return None
        try:
            return kernels.routed_forward(self, tokens, expert_ids, combine)
        except Exception as exc:  # compile/launch errors come as many types
            import warnings

            self.use_kernels = False
            warnings.warn(f"Triton MoE kernels failed ({type(exc).__name__}: {exc}); using the PyTorch path",
                          RuntimeWarning, stacklevel=3)
            return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # [S, D]
        bias = None if self.router.bias is None else self.router.bias.float()
        logits = F.linear(tokens.float(), self.router.weight.float(), bias)  # [S, E] fp32
        expert_ids, gate_probs, combine = route_tokens(  # [S, k] each
            logits, self.top_k, renormalize=self.top_k > 1, second_expert_policy="gumbel", generator=self.generator
        )
        output = self._kernel_experts(tokens, expert_ids, combine) if self.use_kernels and tokens.is_cuda else None
        if output is None:
            output = dispatch_combine(tokens, expert_ids, combine, lambda e, x: self.experts[e](x), self.num_experts)
            if self.meta_expert is not None:
                output = output + self.meta_expert(tokens)
        self.last_routing = RoutingRecord(logits.detach(), expert_ids, gate_probs.detach(), combine.detach())
        return output.view(*batch_shape, -1)


def build_projector(config: MedMoEConfig) -> nn.Module:
    """``mlp<N>x_gelu``: Linear(Dv, D) then (GELU, Linear(D, D)) x (N-1); ``linear``; ``identity``.

    Parameter names match the released ``model.mm_projector.image_spatial_proj.*`` without that prefix.
    """
    if config.image_projector_type == "identity":
        return nn.Identity()
    if config.image_projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    modules: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(_mlp_depth(config.image_projector_type) - 1):
        modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
    return nn.Sequential(*modules)


# ---------------------------------------------------------------------------- language model
@dataclass
class MedMoEOutput:
    logits: torch.Tensor | None  # [B, L', V] float32 (L' = the positions asked for)
    hidden_states: torch.Tensor  # [B, L, D] after the final LayerNorm (the input of lm_head)
    past_key_values: object | None  # transformers DynamicCache when use_cache
    routing: list[RoutingRecord]  # one per MoE layer (config.moe_layers_idx order), tokens flattened B*L
    layer_inputs: tuple[torch.Tensor, ...] | None = None  # input of each decoder layer [B, L, D]
    image_token_start: int | None = None  # index of the first image token in the expanded sequence


class MedMoELanguageModel(nn.Module):
    """Token embeddings -> N x decoder layer (MoE FFN at ``moe_layers_idx``) -> LayerNorm -> lm_head."""

    def __init__(self, config: MedMoEConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.llm_config = base_llm_config(config, attn_implementation)
        if config.base == "phi":
            from transformers.models.phi import modeling_phi as base

            Layer, MLP, Rotary = base.PhiDecoderLayer, base.PhiMLP, base.PhiRotaryEmbedding
        else:
            from transformers.models.stablelm import modeling_stablelm as base

            Layer, MLP, Rotary = base.StableLmDecoderLayer, base.StableLmMLP, base.StableLmRotaryEmbedding

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList()
        for layer_idx in range(config.num_hidden_layers):
            layer = Layer(self.llm_config, layer_idx)
            if config.is_moe_layer(layer_idx):
                layer.mlp = MedMoESparseMoE(
                    lambda: MLP(self.llm_config), config.hidden_size, config.experts_of(layer_idx),
                    config.top_k_experts, config.router_bias, config.meta_expert,
                )
            self.layers.append(layer)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # Phi: final_layernorm
        self.rotary_emb = Rotary(config=self.llm_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def moe_layers(self) -> list[MedMoESparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MedMoESparseMoE)]

    def new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.llm_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_positions: torch.Tensor | slice | None = None,
        output_hidden_states: bool = False,
    ) -> MedMoEOutput:
        """inputs_embeds [B, L, D] -> logits at ``logits_positions`` (all when None), float32."""
        _, query_length, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)[None]
        mask = build_attention_mask(attention_mask, query_length, past_length, inputs_embeds.device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # (cos, sin) [1, L, rotary dims]

        hidden_states = inputs_embeds
        layer_inputs = []
        for layer in self.layers:
            if output_hidden_states:
                layer_inputs.append(hidden_states)
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_ids=position_ids, cache=past_key_values,
                use_cache=use_cache, position_embeddings=position_embeddings,
            )
        hidden_states = self.norm(hidden_states)  # [B, L, D]
        selected = hidden_states if logits_positions is None else hidden_states[:, logits_positions]
        logits = self.lm_head(selected).float()
        routing = [moe.last_routing for moe in self.moe_layers()]
        return MedMoEOutput(
            logits, hidden_states, past_key_values if use_cache else None, routing,  # type: ignore[arg-type]
            tuple(layer_inputs) if output_hidden_states else None,
        )


# ---------------------------------------------------------------------------- the model
@dataclass
class ExpertChoices:
    """Which routed expert(s) every token went to, per MoE layer (the meta expert always runs).

    ``prompt_*``: every position of the expanded prompt; ``answer_*``: every generated token that was
    fed back (the last generated token is never fed, so there is one fewer row than answer tokens).
    """

    layers: list[int]  # decoder layer index of each MoE layer
    num_experts: list[int]
    prompt_experts: torch.Tensor  # [n_moe, L, k] int64 (column 0 = argmax)
    prompt_weights: torch.Tensor  # [n_moe, L, k] float32 combine weights
    prompt_router_logits: torch.Tensor  # [n_moe, L, E] float32
    answer_experts: torch.Tensor  # [n_moe, T', k]
    answer_weights: torch.Tensor  # [n_moe, T', k]
    answer_router_logits: torch.Tensor  # [n_moe, T', E]

    def counts(self, part: str = "answer") -> torch.Tensor:
        """[n_moe, E] first-choice tokens per expert over the ``"prompt"`` or the ``"answer"``."""
        experts = self.answer_experts if part == "answer" else self.prompt_experts  # [n_moe, T, k]
        width = max(self.num_experts)
        counts = torch.zeros((experts.shape[0], width), dtype=torch.int64)
        for m, row in enumerate(experts):
            counts[m] = torch.bincount(row[:, 0].cpu(), minlength=width)
        return counts


def _stack_routing(records: Sequence[Sequence[RoutingRecord]], n_moe: int, k: int, width: int):
    """records[t][m] (one token each) -> experts [n_moe, T, k], weights, logits [n_moe, T, E]."""
    if not records:
        empty = torch.zeros((n_moe, 0, k))
        return empty.long(), empty, torch.zeros((n_moe, 0, width))
    experts = torch.stack([torch.cat([r[m].expert_ids for r in records]) for m in range(n_moe)])
    weights = torch.stack([torch.cat([r[m].combine_weights for r in records]) for m in range(n_moe)])
    # layers may have different expert counts: pad their router logits with NaN to the widest
    logits = torch.stack([
        F.pad(torch.cat([r[m].router_logits for r in records]), (0, width - records[0][m].router_logits.shape[-1]),
              value=float("nan"))
        for m in range(n_moe)
    ])
    return experts.cpu(), weights.float().cpu(), logits.float().cpu()


class MedMoEModel(nn.Module):
    """The whole Med-MoE network plus its tokenizer and image processor settings."""

    capabilities = {"regions": False, "masks": False, "streaming": True, "experts": True}

    def __init__(
        self, config: MedMoEConfig, tokenizer=None, processor: ClipProcessorSettings | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.config = config
        self.image_tower = CLIPVisionTower(config)  # type: ignore[arg-type]  # reads vision_config, mm_vision_*
        self.mm_projector = build_projector(config)
        self.language_model = MedMoELanguageModel(config, attn_implementation)
        self.tokenizer = tokenizer
        self.processor = processor or ClipProcessorSettings()

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def moe_layers_idx(self) -> list[int]:
        return list(self.config.moe_layers_idx)

    # ------------------------------------------------------------------ inputs
    def prepare_image(self, image: np.ndarray, mode: str | None = None) -> torch.Tensor:
        """uint8 (H, W) or (H, W, 3) -> pixel_values [3, S, S] float32.

        ``mode`` ``"pad"`` (the config's ``image_aspect_ratio``, training and the reference CLI) or
        ``"crop"`` (the reference VQA evaluation script); default: the config's.
        """
        mode = mode or ("pad" if self.config.image_aspect_ratio == "pad" else "crop")
        return prepare_image(image, self.processor, mode)[0]

    def build_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        return build_prompt(question, history)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Prompt text with one ``<image>`` -> ids with -200 at the image slot."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with families.medmoe.load(folder)")
        return tokenize_prompt(prompt, self.tokenizer.encode, self.tokenizer.bos_token_id)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] -> (CLIP patch features [B, P, Dv], image tokens [B, P, D])."""
        features = self.image_tower(pixel_values.to(self.device))
        return features, self.mm_projector(features.to(self.dtype))

    def build_inputs_embeds(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> tuple[torch.Tensor, int | None]:
        """input_ids [B, N] (at most one -200 per row, same slot in every row) -> ([B, L, D], image start)."""
        input_ids = input_ids.to(self.device)
        is_image = input_ids == IMAGE_TOKEN_INDEX
        slots = is_image.sum(dim=1)
        if not bool(slots.any()):
            return self.language_model.embed_tokens(input_ids), None
        if image_tokens is None:
            raise ValueError("input_ids hold an image slot (-200) but no pixel_values / image_tokens were given")
        if bool((slots != 1).any()):
            raise ValueError("every row of input_ids needs exactly one image slot (-200)")
        starts = is_image.float().argmax(dim=1)
        if bool((starts != starts[0]).any()):
            raise ValueError("the image slot must be at the same position in every row (pad on the right)")
        start = int(starts[0])
        text = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # [B, N, D]
        image_tokens = image_tokens.to(text.dtype).expand(input_ids.shape[0], -1, -1)
        return torch.cat([text[:, :start], image_tokens, text[:, start + 1 :]], dim=1), start

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_positions: torch.Tensor | slice | None = None,
        output_hidden_states: bool = False,
    ) -> MedMoEOutput:
        """input_ids [B, N] with -200 at the image slot, pixel_values [B, 3, S, S] -> logits [B, L, V].

        ``attention_mask`` is over the *expanded* sequence (cached part included); ``None`` = all ones.
        """
        if image_tokens is None and pixel_values is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            if pixel_values.dim() == 3:
                pixel_values = pixel_values[None]
            image_tokens = self.encode_image(pixel_values)[1]
        embeds, start = self.build_inputs_embeds(input_ids, image_tokens)
        out = self.language_model(
            embeds, attention_mask, past_key_values, use_cache, logits_positions, output_hidden_states
        )
        out.image_token_start = start
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_from_ids(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | threading.Event | None = None,
        return_step_logits: bool = False,
    ) -> tuple[GenerationResult, ExpertChoices]:
        """Prefill the prompt once, then decode token by token with the KV cache.

        Not re-entrant (the MoE layers keep their last routing): the caller serialises calls. Greedy at ``temperature`` 0 (the reference's setting), else nucleus sampling. Stops at the
        tokenizer's eos (``<|endoftext|>``, the template's stop string).
        """
        ids = torch.as_tensor(list(input_ids) if not torch.is_tensor(input_ids) else input_ids, dtype=torch.long)
        ids = ids.reshape(1, -1).to(self.device)
        if pixel_values is not None and pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        n_moe = len(self.config.moe_layers_idx)
        k, width = self.config.top_k_experts, max(self.config.num_experts)
        out = self(ids, pixel_values, use_cache=True, logits_positions=slice(-1, None))
        prompt_routing = list(out.routing)
        cache = out.past_key_values
        step_routing: list[list[RoutingRecord]] = []

        def step(token: int) -> tuple[torch.Tensor, torch.Tensor]:
            token_ids = torch.tensor([[token]], device=self.device)
            step_out = self.language_model(self.language_model.embed_tokens(token_ids), None, cache, True, slice(-1, None))
            step_routing.append(step_out.routing)
            return step_out.logits[0, -1], step_out.hidden_states[0, -1]

        config = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            eos_token_id=self.tokenizer.eos_token_id if self.tokenizer is not None else self.config.eos_token_id,
        )
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda _ids: "")
        result = generate_tokens(
            step, out.logits[0, -1], out.hidden_states[0, -1], decode, config, stream=on_text,
            should_stop=should_stop, return_step_logits=return_step_logits,
        )
        p_exp, p_w, p_log = _stack_routing([prompt_routing], n_moe, k, width)
        a_exp, a_w, a_log = _stack_routing(step_routing, n_moe, k, width)
        choices = ExpertChoices(
            list(self.config.moe_layers_idx), list(self.config.num_experts),
            p_exp, p_w, p_log, a_exp, a_w, a_log,
        )
        result.expert_counts = choices.counts("answer") if len(step_routing) else None
        return result, choices

    def generate(
        self,
        image: np.ndarray,
        question: str,
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | threading.Event | None = None,
        image_mode: str | None = None,
    ) -> tuple[str, list[int], ExpertChoices]:
        """Answer ``question`` about ``image``: (text, new token ids, expert choices per MoE layer).

        ``on_text`` receives the answer piece by piece as it is decoded (streaming).
        """
        pixel_values = self.prepare_image(image, image_mode)
        ids = self.tokenize_prompt(self.build_prompt(question, history))
        result, choices = self.generate_from_ids(
            ids, pixel_values, max_new_tokens, temperature, top_p, seed, on_text, should_stop
        )
        return result.text, result.ids, choices
