"""quantize_llm("int8") on a tiny MedPLIB LLM (CPU, PyTorch twins): bytes, logits, greedy tokens."""

import copy

import pytest
import torch

from napari_medplib.model.config import MedPLIBConfig, MoEConfig
from napari_medplib.model.llm import MedPLIBLanguageModel
from napari_medplib.model.quantize import (
    Int8Experts,
    Int8Linear,
    dequantize_weight,
    module_bytes,
    quantize_llm,
    quantize_weight,
)


def _model(seed=0, shared=False, top_k=1, experts=2):
    torch.manual_seed(seed)
    cfg = MedPLIBConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2,
                        moe=MoEConfig(num_experts=experts, top_k=top_k, shared_expert=shared))
    return MedPLIBLanguageModel(cfg).eval()


def _greedy(model, ids, steps):
    with torch.no_grad():
        out = model(model.embed_tokens(ids), use_cache=True, logits_positions=slice(-1, None))
        cache, nxt, tokens = out.past_key_values, out.logits[:, -1].argmax(-1), []
        for _ in range(steps):
            tokens.append(nxt)
            nxt = model(model.embed_tokens(nxt)[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    return torch.stack(tokens, 1)


def test_quantize_weight_is_symmetric_per_channel_and_within_half_a_step():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and int(q.abs().max()) == 127
    err = (dequantize_weight(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q[2] == 0).all() and (dequantize_weight(q, scale)[2] == 0).all()


@pytest.mark.parametrize("seed,shared,top_k,experts", [(0, False, 1, 2), (1, True, 2, 4), (2, False, 1, 2)])
def test_int8_llm_logits_close_and_greedy_tokens_agree(seed, shared, top_k, experts):
    ref = _model(seed, shared, top_k, experts)
    q = copy.deepcopy(ref)
    report = quantize_llm(q)
    assert report.expert_layers == 2 and all(isinstance(layer.mlp.experts, Int8Experts) for layer in q.layers)
    assert isinstance(q.layers[0].self_attn.q_proj, Int8Linear) and type(q.layers[0].mlp.router) is torch.nn.Linear
    assert type(q.lm_head) is torch.nn.Linear  # kept by default
    prompts = torch.randint(0, 128, (8, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ref(ref.embed_tokens(prompts)).logits, q(q.embed_tokens(prompts)).logits
    # measured on these models: max |diff| 0.004-0.006 on logits of |max| ~2.2, relative (L2) ~1.6e-3;
    # int8 rounding is at most half a step (max|W_row| / 254) per weight. Bounds leave ~5x margin.
    assert (a - b).abs().max() < 0.03
    assert ((a - b).norm() / a.norm()) < 1e-2
    # Greedy ids: a random toy model has near-ties (top-1 margins down to 1e-5), where any perturbation
    # may flip the argmax. Along the reference's greedy path, wherever its top-1 margin exceeds twice
    # the bound on the logit change, int8 must pick the same token.
    ref_ids, q_ids = _greedy(ref, prompts, 8), _greedy(q, prompts, 8)
    with torch.no_grad():
        path = torch.cat([prompts, ref_ids], 1)
        a, b = ref(ref.embed_tokens(path)).logits[:, 9:-1], q(q.embed_tokens(path)).logits[:, 9:-1]
    top2 = a.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.06  # [prompts, steps]
    assert clear.float().mean() > 0.6  # the check below is not vacuous (measured: 0.75-0.8)
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
    same = (q_ids == ref_ids).all(dim=1)
    for row in (~same).nonzero().flatten().tolist():  # a free-running divergence starts at a near-tie
        first = int((q_ids[row] != ref_ids[row]).nonzero()[0])
        assert not clear[row, first], (row, first)
    assert same.sum() >= 4  # of 8 prompts (measured 5, 8, 8 for the three models)


def test_bytes_drop_and_report():
    model = _model()
    before = module_bytes(model)
    report = quantize_llm(model)
    assert report.bytes_before == before and report.bytes_after == module_bytes(model)
    # fp32 -> int8 on everything but the embedding and lm_head (kept): > 2x for this toy model
    assert report.ratio > 2.0 and "int8" in str(report)
    lm_head = model.lm_head.weight.numel() * 4
    report2 = quantize_llm(model, include_lm_head=True)  # experts already done; only lm_head left
    assert report2.expert_layers == 0 and report2.linears == 1
    assert report.bytes_after - report2.bytes_after == lm_head - lm_head // 4 - model.lm_head.out_features * 4


def test_dtype_cast_keeps_int8_and_fp32_scales():
    model = _model()
    quantize_llm(model)
    proj = model.layers[0].self_attn.q_proj
    scale = proj.weight_scale.clone()
    model.to(torch.bfloat16)
    assert proj.weight_int8.dtype == torch.int8 and torch.equal(proj.weight_scale, scale)
    with torch.no_grad():
        out = model(model.embed_tokens(torch.tensor([[1, 2, 3]]))).logits
    assert torch.isfinite(out).all()


def test_static_decoder_runs_the_quantized_model():
    from napari_medplib.kernels.graph_decode import StaticDecoder

    model = _model(3)
    quantize_llm(model)
    prompts = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = model.embed_tokens(prompts)
    assert torch.equal(StaticDecoder(model, max_len=24, batch=2).generate(embeds, 6), _greedy(model, prompts, 6))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="int8"):
        quantize_llm(_model(), "int4")
