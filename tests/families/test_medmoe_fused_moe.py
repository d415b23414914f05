"""Med-MoE's MoE layer on the Triton expert kernels vs its PyTorch path (toy shapes).

Routing stays in PyTorch (fp32 router with bias, top-2 with the Gumbel second choice); only the experts
and the meta expert go through ``kernels.moe.fused_experts``. On CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, set here before any kernel module is imported); without triton
these tests skip, and the GPU test skips without CUDA.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from napari_medplib.families.medmoe.modeling import MedMoESparseMoE  # noqa: E402
from napari_medplib.model.moe import dispatch_combine, route_tokens  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 32, 48, 4, 2
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _interpreter_or_cuda() -> None:
    from napari_medplib.kernels import _runtime

    if not HAS_CUDA and not _runtime.INTERPRET:
        pytest.skip("kernels were imported without TRITON_INTERPRET=1 and there is no GPU")


def _layer(style: str, dtype=torch.float32, device="cpu", seed=0) -> MedMoESparseMoE:
    if style == "stablelm":
        from transformers import StableLmConfig
        from transformers.models.stablelm.modeling_stablelm import StableLmMLP

        cfg = StableLmConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu")
        make = lambda: StableLmMLP(cfg)  # noqa: E731
    else:
        from transformers import PhiConfig
        from transformers.models.phi.modeling_phi import PhiMLP

        cfg = PhiConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu_new")
        make = lambda: PhiMLP(cfg)  # noqa: E731
    torch.manual_seed(seed)
    layer = MedMoESparseMoE(make, HIDDEN, EXPERTS, TOP_K, router_bias=True, meta_expert=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    return layer.to(device).eval()


def _route(layer: MedMoESparseMoE, tokens: torch.Tensor, seed: int):
    bias = layer.router.bias.float()
    logits = torch.nn.functional.linear(tokens.float(), layer.router.weight.float(), bias)
    return route_tokens(logits, TOP_K, renormalize=True, second_expert_policy="gumbel",
                        generator=torch.Generator().manual_seed(seed))


def _pytorch_path(layer: MedMoESparseMoE, tokens, expert_ids, combine):
    out = dispatch_combine(tokens, expert_ids, combine, lambda e, x: layer.experts[e](x), EXPERTS)
    return out + layer.meta_expert(tokens)


@needs_triton
@pytest.mark.parametrize("num_tokens", [2, 5])  # 2: decode GEMV tiles, 5: grouped prefill tiles
def test_kernel_experts_match_pytorch_path_top2_of_4_with_meta(num_tokens):
    _interpreter_or_cuda()
    device = "cuda" if HAS_CUDA else "cpu"
    layer = _layer("stablelm", device=device)
    tokens = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expert_ids, _, combine = _route(layer, tokens, seed=7)
        ref = _pytorch_path(layer, tokens, expert_ids, combine)
        out = layer._kernel_experts(tokens, expert_ids, combine)
    assert out is not None and layer.use_kernels
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs_triton
def test_kernel_experts_bf16_within_rounding():
    _interpreter_or_cuda()
    device = "cuda" if HAS_CUDA else "cpu"
    layer = _layer("stablelm", device=device, seed=2).to(torch.bfloat16)
    tokens = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    with torch.no_grad():
        expert_ids, _, combine = _route(layer, tokens, seed=4)
        ref = _pytorch_path(layer, tokens, expert_ids, combine).float()
        out = layer._kernel_experts(tokens, expert_ids, combine)
    assert out is not None and out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


@needs_triton
def test_phi_gelu_experts_use_their_kernels_and_training_stays_on_pytorch_path():
    """Phi-2 experts (fc1 -> GELU(tanh) -> fc2 with biases) go through ``fused_mlp_experts``
    (tests/kernels/test_moe_gelu_experts.py covers them); with grad enabled nothing is offloaded."""
    _interpreter_or_cuda()
    tokens = torch.randn(3, HIDDEN)
    phi = _layer("phi")
    expert_ids, _, combine = _route(phi, tokens, seed=0)
    with torch.no_grad():
        out = phi._kernel_experts(tokens, expert_ids, combine)
        ref = _pytorch_path(phi, tokens, expert_ids, combine)
    assert out is not None
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    stablelm = _layer("stablelm")
    assert stablelm._kernel_experts(tokens, expert_ids, combine) is None  # grad enabled: training path


def test_cpu_forward_keeps_routing_and_pytorch_numbers():
    """On CPU the layer's forward is the PyTorch path, expert choices as ``route_tokens`` gives them."""
    for style in ("stablelm", "phi"):
        layer = _layer(style)
        tokens = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(5))
        layer.generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            out = layer(tokens)
            expert_ids, _, combine = _route(layer, tokens[0], seed=11)
            ref = _pytorch_path(layer, tokens[0], expert_ids, combine)
        assert torch.equal(layer.last_routing.expert_ids, expert_ids)
        assert torch.equal(out[0], ref)


@needs_triton
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 40])
def test_cuda_forward_uses_kernels_with_same_routing(num_tokens):
    layer = _layer("stablelm", device="cuda")
    tokens = torch.randn(1, num_tokens, HIDDEN, generator=torch.Generator().manual_seed(8)).cuda()
    with torch.no_grad():
        layer.generator = torch.Generator().manual_seed(9)
        out = layer(tokens)
        rec = layer.last_routing
        layer.use_kernels = False
        layer.generator = torch.Generator().manual_seed(9)
        ref = layer(tokens)
    assert torch.equal(rec.expert_ids, layer.last_routing.expert_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
