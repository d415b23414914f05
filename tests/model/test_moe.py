"""The MoE feed-forward block: routing semantics, sparse compute, capacity, shared expert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_medplib.model.config import MoEConfig
from napari_medplib.model.moe import (
    MoEFeedForward,
    capacity_drops,
    moe_forward_reference,
    route_tokens,
)

HIDDEN, INTER = 16, 24


def _moe(seed: int = 0, **kwargs) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(HIDDEN, INTER, MoEConfig(**kwargs)).eval()
    with torch.no_grad():
        moe.router.weight.mul_(8)  # clear routing margins
    return moe


def _expert(moe: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = moe.experts[e]
    return F.linear(F.silu(F.linear(x, ex.gate_proj.weight)) * F.linear(x, ex.up_proj.weight), ex.down_proj.weight)


def _dense(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Naive computation: every expert on every token, then mask by routing."""
    cfg = moe.config
    logits = x.float() @ moe.router.weight.float().T
    if moe.router.bias is not None:
        logits = logits + moe.router.bias.float()
    probs = logits.softmax(-1)
    top = probs.topk(cfg.top_k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if cfg.renormalize else top.values
    all_out = torch.stack([_expert(moe, e, x) for e in range(cfg.num_experts)], dim=1)  # [S, E, D]
    out = torch.zeros_like(x)
    for k in range(cfg.top_k):
        out += weights[:, k : k + 1] * all_out[torch.arange(x.shape[0]), top.indices[:, k]]
    if moe.shared_expert is not None:
        ex = moe.shared_expert
        out += F.linear(F.silu(F.linear(x, ex.gate_proj.weight)) * F.linear(x, ex.up_proj.weight), ex.down_proj.weight)
    return out


def test_top1_output_is_raw_probability_times_expert():
    moe = _moe(num_experts=2, top_k=1)
    x = torch.randn(2, 7, HIDDEN)
    out = moe(x)
    flat = x.reshape(-1, HIDDEN)
    probs = (flat @ moe.router.weight.T).softmax(-1)
    chosen = probs.argmax(-1)
    for i in range(flat.shape[0]):
        e = int(chosen[i])
        expected = probs[i, e] * _expert(moe, e, flat[i : i + 1])[0]
        torch.testing.assert_close(out.reshape(-1, HIDDEN)[i], expected)
    rec = moe.last_routing
    assert torch.equal(rec.expert_ids[:, 0], chosen)
    assert (rec.gate_probs[:, 0] >= 0.5).all() and (rec.gate_probs[:, 0] < 1).any()  # not renormalised
    assert rec.router_logits.dtype == torch.float32 and rec.router_logits.shape == (14, 2)


def test_only_chosen_experts_run_on_their_tokens():
    moe = _moe(num_experts=4, top_k=1)
    seen: dict[int, int] = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: seen.__setitem__(e, seen.get(e, 0) + inp[0].shape[0]))
    x = torch.randn(30, HIDDEN)
    moe(x)
    counts = moe.last_routing.expert_counts(4)
    assert sum(seen.values()) == 30  # each token through exactly one expert, no dense compute
    for e in range(4):
        assert seen.get(e, 0) == int(counts[e])
    # A token set routed to one expert only calls that expert.
    seen.clear()
    one = int(counts.argmax())
    moe(x[moe.last_routing.expert_ids[:, 0] == one])
    assert set(seen) == {one}


@pytest.mark.parametrize("top_k,shared,bias", [(1, False, False), (2, True, True), (2, False, False), (3, True, False)])
def test_matches_naive_dense_computation(top_k, shared, bias):
    moe = _moe(num_experts=4, top_k=top_k, shared_expert=shared, router_bias=bias)
    if bias:
        with torch.no_grad():
            moe.router.bias.normal_()
    x = torch.randn(25, HIDDEN)
    torch.testing.assert_close(moe(x), _dense(moe, x), rtol=1e-5, atol=1e-5)
    if top_k > 1:
        torch.testing.assert_close(moe.last_routing.combine_weights.sum(-1), torch.ones(25))


def test_functional_reference_equals_module():
    moe = _moe(num_experts=3, top_k=2, shared_expert=True)
    x = torch.randn(11, HIDDEN)
    weights = [(ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight) for ex in moe.experts]
    shared = (moe.shared_expert.gate_proj.weight, moe.shared_expert.up_proj.weight, moe.shared_expert.down_proj.weight)
    out, record = moe_forward_reference(x, moe.router.weight, weights, top_k=2, shared_weights=shared)
    torch.testing.assert_close(out, moe(x))
    assert torch.equal(record.expert_ids, moe.last_routing.expert_ids)


def test_capacity_drops_only_in_training():
    moe = _moe(num_experts=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():  # send every token to expert 0
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.randn(20, HIDDEN)
    x[:, 0] = x[:, 0].abs() + 1
    eval_out = moe(x)
    assert moe.last_routing.dropped is None
    assert (eval_out.abs().sum(-1) > 0).all()  # nothing dropped at inference
    moe.train()
    moe.generator = torch.Generator().manual_seed(0)
    train_out = moe(x)
    dropped = moe.last_routing.dropped[:, 0]
    assert int((~dropped).sum()) == moe.capacity(20) == 5
    assert (train_out[dropped] == 0).all()  # dropped tokens get no MoE output
    torch.testing.assert_close(train_out[~dropped], eval_out[~dropped])


def test_capacity_prefers_first_choices():
    expert_ids = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    dropped = capacity_drops(expert_ids, num_experts=2, capacity=3, use_rts=False)
    # expert 0: 3 first choices + 1 second choice (token 1) -> the second choice is dropped;
    # expert 1: 1 first choice (token 1) + 3 second choices -> the latest second choice (token 3) is dropped.
    assert dropped.tolist() == [[False, False], [False, True], [False, False], [False, True]]


def test_router_runs_in_float32_with_bf16_weights():
    moe = _moe(num_experts=2, top_k=1).to(torch.bfloat16)
    x = torch.randn(5, HIDDEN, dtype=torch.bfloat16)
    out = moe(x)
    assert out.dtype == torch.bfloat16
    assert moe.last_routing.router_logits.dtype == torch.float32


def test_gumbel_second_choice_is_stochastic_but_first_is_argmax():
    logits = torch.randn(200, 4)
    ids_a, _, _ = route_tokens(logits, 2, True, "gumbel", torch.Generator().manual_seed(1))
    ids_b, _, _ = route_tokens(logits, 2, True, "gumbel", torch.Generator().manual_seed(2))
    assert torch.equal(ids_a[:, 0], logits.argmax(-1))
    assert not torch.equal(ids_a[:, 1], ids_b[:, 1])
    assert (ids_a[:, 0] != ids_a[:, 1]).all()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)


def test_deepspeed_style_eval_drops_are_opt_in():
    moe = _moe(num_experts=4, top_k=1, eval_capacity_factor=2.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.randn(16, HIDDEN)
    x[:, 0] = x[:, 0].abs() + 1  # every token wants expert 0; DeepSpeed's eval capacity is 16/4*2 = 8
    moe(x)
    assert moe.last_routing.dropped is None
    moe.config.eval_drop_tokens = True
    moe.generator = torch.Generator().manual_seed(0)
    moe(x)
    assert int(moe.last_routing.dropped.sum()) == 8 and moe.capacity(16) == 8


def test_failing_kernels_fall_back_to_pytorch_with_a_warning(monkeypatch):
    from napari_medplib.model import moe as moe_module

    class BrokenKernels:
        calls = 0

        @staticmethod
        def supports(module, tokens):
            return True

        @classmethod
        def fused_forward(cls, module, tokens):
            cls.calls += 1
            raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(moe_module, "_triton_dispatch", lambda: BrokenKernels)
    layer = MoEFeedForward(HIDDEN, INTER, MoEConfig(num_experts=2, top_k=1)).eval()
    tokens = torch.randn(5, HIDDEN)
    with pytest.warns(RuntimeWarning, match="PTX compile failed"):
        assert layer._fused_forward(tokens) is None
    assert not layer.use_kernels and BrokenKernels.calls == 1
