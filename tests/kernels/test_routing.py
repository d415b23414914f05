"""Router kernel vs the PyTorch twin (fp32 logits, softmax, top-k, renormalisation)."""

import pytest
import torch
import torch.nn.functional as F

from napari_medplib.model.moe import route_tokens

routing = pytest.importorskip("napari_medplib.kernels.routing", reason="triton is not installed")


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_matches_twin(device, num_experts, top_k, bias, renormalize):
    gen = torch.Generator().manual_seed(num_experts * 10 + top_k)
    tokens = torch.randn(37, 96, generator=gen).to(device)  # 37: a partial last token block
    router_w = torch.randn(num_experts, 96, generator=gen).to(device)
    router_b = torch.randn(num_experts, generator=gen).to(device) if bias else None
    logits, ids, gate, combine = routing.route(tokens, router_w, router_b, top_k, renormalize)
    ref_logits = F.linear(tokens, router_w, router_b)
    ref_ids, ref_gate, ref_combine = route_tokens(ref_logits, top_k, renormalize)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(gate, ref_gate)
    torch.testing.assert_close(combine, ref_combine)
    if renormalize:
        torch.testing.assert_close(combine.sum(-1), torch.ones(37, device=device))


def test_route_loops_over_hidden_in_blocks(device):
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(19, 72, generator=gen).to(device)  # 72 = 4 full 16-blocks + a masked tail
    router_w = torch.randn(4, 72, generator=gen).to(device)
    logits, ids, _, _ = routing.route(tokens, router_w, None, 2, True, block_tokens=8, block_d=16)
    ref_logits = F.linear(tokens, router_w)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.long(), route_tokens(ref_logits, 2, True)[0])


def test_route_bf16_tokens_are_routed_in_fp32(device):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(20, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    router_w = torch.randn(4, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    logits, ids, _gate, _ = routing.route(tokens, router_w, None, 2, True)
    ref_logits = F.linear(tokens.float(), router_w.float())  # the reference casts both to fp32
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.long(), route_tokens(ref_logits, 2, True)[0])


def test_route_rejects_mismatched_shapes(device):
    with pytest.raises(ValueError, match="router_w"):
        routing.route(torch.randn(3, 8, device=device), torch.randn(2, 9, device=device))
    with pytest.raises(ValueError, match="top_k"):
        routing.route(torch.randn(3, 8, device=device), torch.randn(2, 8, device=device), top_k=3)
