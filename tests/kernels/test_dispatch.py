"""MoEFeedForward <-> fused_moe glue: weight packing without copies, same outputs, fallbacks."""

import pytest
import torch

from napari_medplib.model.config import MoEConfig
from napari_medplib.model.moe import MoEFeedForward

pytest.importorskip("triton", reason="triton is not installed")
from napari_medplib.kernels import dispatch

HIDDEN, INTER = 32, 48


def _module(device, **cfg):
    torch.manual_seed(0)
    moe = MoEFeedForward(HIDDEN, INTER, MoEConfig(**cfg)).eval().to(device)
    with torch.no_grad():
        moe.router.weight.mul_(8)
    return moe


@pytest.mark.parametrize("cfg", [{"num_experts": 2, "top_k": 1}, {"num_experts": 4, "top_k": 2, "shared_expert": True, "router_bias": True}])
def test_fused_forward_matches_module(device, cfg):
    moe = _module(device, **cfg)
    tokens = torch.randn(21, HIDDEN, device=device)
    moe.use_kernels = False
    with torch.no_grad():
        expected = moe(tokens)
        ref_ids = moe.last_routing.expert_ids
        out, rec = dispatch.fused_forward(moe, tokens)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(rec.expert_ids, ref_ids)


def test_packing_shares_storage_and_keeps_state_dict(device):
    moe = _module(device, num_experts=2)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    gate, up, down = dispatch.packed_expert_weights(moe)
    assert gate.shape == (2, INTER, HIDDEN) and down.shape == (2, HIDDEN, INTER)
    for e, ex in enumerate(moe.experts):
        assert ex.gate_proj.weight.data_ptr() == gate[e].data_ptr()
        assert ex.down_proj.weight.data_ptr() == down[e].data_ptr()
    after = moe.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dispatch.packed_expert_weights(moe)[0] is gate  # cached while the views hold
    with torch.no_grad():
        moe.experts[1].up_proj.weight.add_(1.0)  # in-place edits reach the packed copy
    assert torch.equal(up[1], moe.experts[1].up_proj.weight)
    moe.experts[0].gate_proj.weight = torch.nn.Parameter(torch.zeros(INTER, HIDDEN, device=device))
    repacked = dispatch.packed_expert_weights(moe)[0]  # replaced parameter -> packed again
    assert repacked is not gate and torch.equal(repacked[0], torch.zeros(INTER, HIDDEN, device=device))


def test_packing_under_inference_mode_keeps_parameters_trainable(device):
    moe = _module(device, num_experts=2)
    with torch.inference_mode():
        gate, _, _ = dispatch.packed_expert_weights(moe)
    assert not gate.is_inference()
    moe.train()
    moe(torch.randn(5, HIDDEN, device=device)).sum().backward()  # would raise on inference tensors
    assert moe.experts[0].gate_proj.weight.grad is not None or moe.experts[1].gate_proj.weight.grad is not None


def test_supports_only_deterministic_inference(device):
    tokens = torch.randn(4, HIDDEN, device=device)
    with torch.no_grad():
        assert dispatch.supports(_module(device, num_experts=2), tokens)
        assert not dispatch.supports(_module(device, num_experts=2).train(), tokens)
        assert not dispatch.supports(_module(device, num_experts=4, top_k=2, second_expert_policy="gumbel"), tokens)
        assert not dispatch.supports(_module(device, num_experts=2, eval_drop_tokens=True), tokens)
    assert not dispatch.supports(_module(device, num_experts=2), tokens)  # autograd on: PyTorch path


def test_cpu_module_never_calls_the_kernels(monkeypatch):
    moe = _module("cpu", num_experts=2)
    monkeypatch.setattr(dispatch, "fused_forward", lambda *a: pytest.fail("kernel path used on CPU"))
    with torch.no_grad():
        assert moe(torch.randn(3, HIDDEN)).shape == (3, HIDDEN)
