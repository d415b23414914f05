"""The LLaMA-2 decoder of MedPLIB with MoE feed-forward blocks.

Built from transformers' own Llama pieces (``LlamaDecoderLayer``, ``LlamaRMSNorm``,
``LlamaRotaryEmbedding``) with each MoE layer's ``mlp`` swapped for our ``MoEFeedForward``. We drive
the layers ourselves instead of using ``LlamaModel.forward`` because we need (a) ``inputs_embeds``
with spliced image/region vectors, (b) an explicit causal mask when a prompt is extended on top of
a cached prefix (SDPA's ``is_causal`` is top-left aligned), and (c) the routing of every layer.
Parameter names match ``LlamaForCausalLM`` (``embed_tokens``, ``layers.{i}.self_attn.q_proj`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MedPLIBConfig
from .moe import MoEFeedForward, RoutingRecord


def llama_config_from(config: MedPLIBConfig, attn_implementation: str = "sdpa"):
    """The transformers ``LlamaConfig`` equivalent of our config (for the building blocks)."""
    from transformers import LlamaConfig

    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    llama._attn_implementation = attn_implementation
    return llama


@dataclass
class LanguageModelOutput:
    logits: torch.Tensor | None  # [B, L', V] float32 (L' = positions asked for)
    hidden_states: torch.Tensor  # [B, L, D] after the final RMSNorm (the input of lm_head)
    past_key_values: object | None  # transformers DynamicCache
    routing: list[RoutingRecord | None]  # per layer; None for dense layers


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, device: torch.device
) -> torch.Tensor | None:
    """Bool mask [B|1, 1, q, past+q] (True = attend), or None when plain causal SDPA is exact.

    ``attention_mask`` is the usual [B, past+q] 1/0 padding mask.
    """
    needs_padding = attention_mask is not None and not bool(attention_mask.all())
    if not needs_padding and (past_length == 0 or query_length == 1):
        return None
    kv_length = past_length + query_length
    query_pos = torch.arange(query_length, device=device)[:, None] + past_length
    key_pos = torch.arange(kv_length, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # [1, 1, q, kv]
    if needs_padding:
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = mask | (key_pos == query_pos)[None, None]  # a padded query still sees itself (no NaN rows)
    return mask


class MedPLIBLanguageModel(nn.Module):
    """Token embeddings -> N x (attention + MoE FFN) -> RMSNorm -> lm_head (untied)."""

    def __init__(self, config: MedPLIBConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        self.config = config
        self.llama_config = llama_config_from(config, attn_implementation)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList()
        for layer_idx in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(self.llama_config, layer_idx)
            if config.moe is not None and config.moe.is_moe_layer(layer_idx):
                layer.mlp = MoEFeedForward(config.hidden_size, config.intermediate_size, config.moe)
            self.layers.append(layer)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=self.llama_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def moe_layers(self) -> list[MoEFeedForward | None]:
        return [layer.mlp if isinstance(layer.mlp, MoEFeedForward) else None for layer in self.layers]

    def new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.llama_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_positions: torch.Tensor | slice | None = None,
        compute_logits: bool = True,
    ) -> LanguageModelOutput:
        """inputs_embeds [B, L, D] -> logits/hidden states.

        ``logits_positions`` selects the positions whose logits are computed (e.g. ``slice(-1, None)``
        while generating); ``None`` = all. Logits are returned in float32, as the reference does.
        """
        _, query_length, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)[None]
        mask = build_attention_mask(attention_mask, query_length, past_length, inputs_embeds.device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # (cos, sin) [1|B, L, head_dim]

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
            )
        hidden_states = self.norm(hidden_states)  # [B, L, D]
        logits = None
        if compute_logits:
            selected = hidden_states if logits_positions is None else hidden_states[:, logits_positions]
            logits = self.lm_head(selected).float()
        routing = [moe.last_routing if moe is not None else None for moe in self.moe_layers()]
        return LanguageModelOutput(logits, hidden_states, past_key_values if use_cache else None, routing)
