"""int8 weight-only kernels (kernels.int8) vs their PyTorch twins (model.quantize); interpreter on CPU."""

import pytest
import torch

from napari_medplib.model.config import MoEConfig
from napari_medplib.model.moe import MoEFeedForward
from napari_medplib.model.quantize import (
    Int8Experts,
    int8_expert_reference,
    int8_linear_reference,
    quantize_llm,
    quantize_weight,
)

k8 = pytest.importorskip("napari_medplib.kernels.int8", reason="triton is not installed")


def _quantized(n_out, k_in, experts=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (n_out, k_in) if experts is None else (experts, n_out, k_in)
    q, scale = quantize_weight(torch.randn(*shape, generator=gen) / k_in**0.5)
    return q.to(device), scale.to(device)


@pytest.mark.parametrize("rows", [1, 3, 5, 40])  # GEMV (<= 4 rows) and GEMM, ragged M
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_fp32_matches_twin(device, rows, bias):
    q, scale = _quantized(40, 72, seed=rows)
    q, scale = q.to(device), scale.to(device)
    x = torch.randn(rows, 72, generator=torch.Generator().manual_seed(1)).to(device)
    b = torch.randn(40).to(device) if bias else None
    out = k8.int8_linear(x, q, scale, b, block_n=16, block_k=16)  # several K steps and N tiles, ragged tails
    torch.testing.assert_close(out, int8_linear_reference(x, q, scale, b), rtol=1e-5, atol=1e-5)


def test_int8_linear_keeps_leading_dims_and_half_precision(device):
    q, scale = _quantized(48, 64, seed=2, device=device)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    out = k8.int8_linear(x, q, scale)
    assert out.shape == (2, 9, 48) and out.dtype == torch.bfloat16
    ref = int8_linear_reference(x.float(), q, scale)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)  # only the output rounding to bf16


@pytest.mark.parametrize("x_div", [1, 2])
def test_int8_expert_gemv_reads_each_rows_expert(device, x_div):
    q, scale = _quantized(24, 40, experts=4, seed=4, device=device)
    tokens = 5
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(5)).to(device)
    ids = torch.tensor([0, 1, 1, 2, 0] if x_div == 1 else [3, 0, 1, 3, 2, 2, 0, 1, 3, 0], device=device)
    out = k8.int8_expert_gemv(x, q, scale, ids, x_div, block_n=16, block_k=16)
    torch.testing.assert_close(out, int8_expert_reference(x, q, scale, ids, x_div), rtol=1e-5, atol=1e-5)
    # poison an expert no row chose: the output must not see it
    if x_div == 1:  # expert 3 is not chosen
        q[3] = 127
        torch.testing.assert_close(k8.int8_expert_gemv(x, q, scale, ids, x_div), out, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_explained(device):
    q, scale = _quantized(8, 16, device=device)
    with pytest.raises(k8.KernelInputError, match="int8"):
        k8.int8_linear(torch.randn(2, 16, device=device), q.float(), scale)
    with pytest.raises(k8.KernelInputError, match="do not fit"):
        k8.int8_linear(torch.randn(2, 12, device=device), q, scale)


@pytest.mark.parametrize("num_experts,top_k,shared", [(2, 1, False), (4, 2, True)])
def test_int8_moe_layer_graph_path_equals_expert_loop(num_experts, top_k, shared):
    """Int8Experts.fused_forward (device-indexed expert GEMVs, no host sync) == the PyTorch expert loop
    over the same int8 experts; kernels under the interpreter on CPU."""
    torch.manual_seed(0)
    moe = MoEFeedForward(32, 48, MoEConfig(num_experts=num_experts, top_k=top_k, shared_expert=shared)).eval()
    with torch.no_grad():
        moe.router.weight.mul_(8)  # clear routing margins
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mlp = moe
    report = quantize_llm(model)
    assert isinstance(moe.experts, Int8Experts) and report.expert_layers == 1
    tokens = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loop = moe(tokens[None])[0]  # CPU: the PyTorch loop calling experts[e] (twin matmuls)
        loop_ids = moe.last_routing.expert_ids
        for module in (moe.experts, getattr(moe.shared_expert, "gate_proj", None), getattr(moe.shared_expert, "up_proj", None),
                       getattr(moe.shared_expert, "down_proj", None)):
            if module is not None:
                module.use_kernel = True
        out, record = moe.experts.fused_forward(moe, tokens)
    assert torch.equal(record.expert_ids, loop_ids)
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_int8_linear_bf16_7b_shapes(rows):
    q, scale = _quantized(11008, 4096, seed=rows, device="cuda")
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    out = k8.int8_linear(x, q, scale)
    ref = int8_linear_reference(x.float(), q, scale)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_int8_quantized_model_graph_decode_equals_eager_and_cpu():
    from napari_medplib.kernels.graph_decode import StaticDecoder
    from napari_medplib.model.config import MedPLIBConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    torch.manual_seed(0)
    cfg = MedPLIBConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, moe=MoEConfig(num_experts=2, top_k=1))
    model = MedPLIBLanguageModel(cfg).eval()
    quantize_llm(model)
    embeds = torch.randn(1, 9, 64)
    cpu_ids = StaticDecoder(model, max_len=32, attention="masked").generate(embeds, 8)
    model.cuda()
    eager = StaticDecoder(model, max_len=32, use_graph=False).generate(embeds.cuda(), 8)
    graphed = StaticDecoder(model, max_len=32, use_graph=True).generate(embeds.cuda(), 8)
    assert torch.equal(eager, graphed) and torch.equal(graphed.cpu(), cpu_ids)
