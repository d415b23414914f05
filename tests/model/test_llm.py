"""The MoE LLaMA decoder: KV cache, causal mask on a cached prefix, padding, MoE placement, dtypes."""

from __future__ import annotations

import pytest
import torch

from napari_medplib.model.config import MedPLIBConfig, MoEConfig
from napari_medplib.model.llm import MedPLIBLanguageModel, build_attention_mask
from napari_medplib.model.moe import MoEFeedForward


def tiny_config(**overrides) -> MedPLIBConfig:
    values = dict(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, moe=MoEConfig(num_experts=2, top_k=1),
    )
    values.update(overrides)
    return MedPLIBConfig(**values)


@pytest.fixture(scope="module")
def lm() -> MedPLIBLanguageModel:
    torch.manual_seed(0)
    return MedPLIBLanguageModel(tiny_config()).eval()


def _embeds(lm, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lm.embed_tokens(torch.randint(3, 50, (1, length), generator=g))


@torch.no_grad()
def test_kv_cache_steps_equal_full_forward(lm):
    embeds = _embeds(lm, 12)
    full = lm(embeds)
    prefix = lm(embeds[:, :8], use_cache=True)
    cache = prefix.past_key_values
    torch.testing.assert_close(prefix.logits, full.logits[:, :8], rtol=1e-5, atol=1e-5)
    for t in range(8, 12):
        step = lm(embeds[:, t : t + 1], past_key_values=cache, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.hidden_states[:, -1], full.hidden_states[:, t], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 12


@torch.no_grad()
def test_chunk_on_cached_prefix_is_causal(lm):
    """A multi-token chunk after a cached prefix needs a bottom-right aligned causal mask."""
    embeds = _embeds(lm, 10)
    full = lm(embeds)
    cache = lm(embeds[:, :4], use_cache=True).past_key_values
    chunk = lm(embeds[:, 4:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(chunk.logits, full.logits[:, 4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_right_padding_does_not_change_valid_positions(lm):
    a, b = _embeds(lm, 9, seed=2), _embeds(lm, 6, seed=3)
    batch = torch.zeros(2, 9, a.shape[-1])
    batch[0], batch[1, :6] = a[0], b[0]
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = lm(batch, attention_mask=mask)
    torch.testing.assert_close(out.logits[1, :6], lm(b).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0], lm(a).logits[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.logits).all()


def test_attention_mask_shapes():
    assert build_attention_mask(None, 5, 0, torch.device("cpu")) is None  # plain causal SDPA
    assert build_attention_mask(None, 1, 7, torch.device("cpu")) is None  # one query sees everything
    mask = build_attention_mask(None, 2, 3, torch.device("cpu"))
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@torch.no_grad()
def test_logits_positions_and_routing_records(lm):
    embeds = _embeds(lm, 7)
    out = lm(embeds, logits_positions=slice(-1, None))
    assert out.logits.shape == (1, 1, 50) and out.logits.dtype == torch.float32
    assert out.hidden_states.shape == (1, 7, 32)
    assert len(out.routing) == 3 and all(r.expert_ids.shape == (7, 1) for r in out.routing)


def test_moe_only_in_configured_layers_and_norm_eps():
    cfg = tiny_config(rms_norm_eps=1e-6, moe=MoEConfig(num_experts=3, top_k=1, moe_layers=[1]))
    lm = MedPLIBLanguageModel(cfg)
    kinds = [type(layer.mlp).__name__ for layer in lm.layers]
    assert kinds == ["LlamaMLP", "MoEFeedForward", "LlamaMLP"]
    assert lm.layers[0].input_layernorm.variance_epsilon == 1e-6
    assert lm.norm.variance_epsilon == 1e-6
    assert lm.lm_head.weight is not lm.embed_tokens.weight  # untied
    assert lm.llama_config.rope_parameters["rope_theta"] == 10000.0
    out = lm(lm.embed_tokens(torch.tensor([[4, 5, 6]])))
    assert out.routing[0] is None and out.routing[1] is not None


@torch.no_grad()
def test_bf16_forward_keeps_float32_router_and_logits():
    torch.manual_seed(0)
    lm = MedPLIBLanguageModel(tiny_config()).to(torch.bfloat16)
    for layer in lm.layers:
        assert isinstance(layer.mlp, MoEFeedForward)
        layer.mlp.router.float()
    out = lm(lm.embed_tokens(torch.tensor([[4, 5, 6, 7]])))
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32
    assert out.routing[0].router_logits.dtype == torch.float32
