"""fused_mlp_experts (fc1 -> GELU(tanh) -> fc2 with biases, Phi-2's experts) vs its PyTorch twin, and a
tiny Phi-2 Med-MoE layer through the kernels vs its own PyTorch path.

CPU runs use the Triton interpreter (this folder's conftest sets ``TRITON_INTERPRET=1`` before any kernel
module is imported); without triton every test here skips, the CUDA test also without a GPU.
"""

import pytest
import torch

kmoe = pytest.importorskip("napari_medplib.kernels.moe", reason="triton is not installed")
from kernel_helpers import rel_err  # noqa: E402

from napari_medplib.families.medmoe.modeling import MedMoESparseMoE  # noqa: E402
from napari_medplib.kernels import dispatch  # noqa: E402
from napari_medplib.model.moe import dispatch_combine, route_tokens  # noqa: E402

HIDDEN, INTER, EXPERTS = 40, 56, 4  # not multiples of the 16-wide test tiles: masked K/N tails
SMALL_TILES = kmoe.TileConfig(block_m=16, block_n=16, block_k=16, gemv_block_n=16, gemv_block_k=16)


def _weights(dtype=torch.float32, device="cpu", seed=0, bias=True, shared=True):
    """fc1_w [E, I, D], fc1_b [E, I], fc2_w [E, D, I], fc2_b [E, D] (+ the shared MLP), biases O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    w = {
        "fc1_w": rnd(EXPERTS, INTER, HIDDEN, scale=HIDDEN**-0.5),
        "fc1_b": rnd(EXPERTS, INTER, scale=0.5) if bias else None,
        "fc2_w": rnd(EXPERTS, HIDDEN, INTER, scale=INTER**-0.5),
        "fc2_b": rnd(EXPERTS, HIDDEN, scale=0.5) if bias else None,
    }
    w["shared"] = (
        (rnd(INTER, HIDDEN, scale=HIDDEN**-0.5), rnd(INTER, scale=0.5) if bias else None,
         rnd(HIDDEN, INTER, scale=INTER**-0.5), rnd(HIDDEN, scale=0.5) if bias else None)
        if shared else None
    )
    return w


def _choices(num_tokens, top_k, device="cpu", seed=1):
    """Distinct experts per token and weights in (0, 1) that are not renormalised (the kernels take any)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:top_k] for _ in range(num_tokens)])
    combine = torch.rand(num_tokens, top_k, generator=gen) * 0.9 + 0.1
    return ids.to(device), combine.to(device)


def _run(device, num_tokens, top_k, shared, path, tiles=None, dtype=torch.float32, bias=True, seed=0):
    w = _weights(dtype, device, seed, bias, shared)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)
    ids, combine = _choices(num_tokens, top_k, device, seed + 3)
    args = (x, w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"], ids, combine)
    out = kmoe.fused_mlp_experts(*args, shared=w["shared"], tiles=tiles, path=path)
    ref = kmoe.mlp_experts_reference(*args, shared=w["shared"])
    return out, ref


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_tiles_match_twin_with_ragged_token_count(device, top_k, shared):
    """23 tokens in 16-row blocks: the last M-block of every expert is partly padding."""
    out, ref = _run(device, 23, top_k, shared, "grouped", SMALL_TILES)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_gemv_matches_twin(device, top_k, shared):
    out, ref = _run(device, 3, top_k, shared, "gemv", SMALL_TILES)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 2, 5])  # auto: gemv for <= 2 tokens, grouped otherwise
def test_default_tiles_auto_path_match_twin(device, num_tokens):
    out, ref = _run(device, num_tokens, 2, True, "auto", seed=4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_without_biases_matches_twin(device, path):
    out, ref = _run(device, 5, 2, True, path, SMALL_TILES, bias=False, seed=6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_bf16_within_rounding(device, path):
    out, ref = _run(device, 7 if path == "grouped" else 2, 2, True, path, dtype=torch.bfloat16, seed=8)
    assert out.dtype == torch.bfloat16 and out.shape == (ref.shape[0], HIDDEN)
    assert rel_err(out, ref) < 2e-2


def test_second_bias_is_scaled_by_the_routing_weight(device):
    """Only fc2's bias differs between two runs: the outputs differ by exactly combine * b2 (+ shared b2)."""
    w = _weights(device=device, seed=10)
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(11)).to(device)
    ids, combine = _choices(6, 2, device, seed=12)
    zero_b2 = torch.zeros_like(w["fc2_b"])
    base = kmoe.fused_mlp_experts(x, w["fc1_w"], w["fc1_b"], w["fc2_w"], zero_b2, ids, combine, path="grouped")
    full = kmoe.fused_mlp_experts(x, w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"], ids, combine, path="grouped")
    expected = (combine[:, :, None] * w["fc2_b"][ids]).sum(dim=1)  # [S, D]
    torch.testing.assert_close(full - base, expected, rtol=1e-4, atol=1e-5)


def test_twin_matches_phi_mlp_modules():
    """The twin is what transformers' PhiMLP (gelu_new) computes, expert by expert, through dispatch_combine."""
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    torch.manual_seed(13)
    cfg = PhiConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu_new")
    mlps = [PhiMLP(cfg) for _ in range(EXPERTS + 1)]
    x = torch.randn(9, HIDDEN)
    ids, combine = _choices(9, 2, seed=14)
    stack = {f"{n}_{p[0]}": torch.stack([getattr(getattr(m, n), p).detach() for m in mlps[:EXPERTS]])
             for n in ("fc1", "fc2") for p in ("weight", "bias")}
    meta = mlps[EXPERTS]
    shared = (meta.fc1.weight, meta.fc1.bias, meta.fc2.weight, meta.fc2.bias)
    with torch.no_grad():
        ref = dispatch_combine(x, ids, combine, lambda e, t: mlps[e](t), EXPERTS) + meta(x)
        twin = kmoe.mlp_experts_reference(x, stack["fc1_w"], stack["fc1_b"], stack["fc2_w"], stack["fc2_b"],
                                          ids, combine, shared=shared)
    torch.testing.assert_close(twin, ref, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused(device):
    w = _weights(device=device)
    x = torch.randn(4, HIDDEN, device=device)
    ids, combine = _choices(4, 2, device)
    args = (x, w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"], ids, combine)
    with pytest.raises(kmoe.KernelInputError, match="activation"):
        kmoe.fused_mlp_experts(*args, activation="relu")
    with pytest.raises(kmoe.KernelInputError, match="fc2_b"):
        kmoe.fused_mlp_experts(x, w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"][:, :-1], ids, combine)
    with pytest.raises(kmoe.KernelInputError, match="shared fc1_b"):
        bad = (w["shared"][0], w["shared"][1][:-1], *w["shared"][2:])
        kmoe.fused_mlp_experts(*args, shared=bad)


# ---------------------------------------------------------------------------- Phi-2 Med-MoE layer
def _phi_layer(top_k, meta, dtype=torch.float32, device="cpu", seed=0) -> MedMoESparseMoE:
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    cfg = PhiConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu_new")
    torch.manual_seed(seed)
    layer = MedMoESparseMoE(lambda: PhiMLP(cfg), HIDDEN, EXPERTS, top_k, router_bias=True, meta_expert=meta)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    return layer.to(device, dtype).eval()


def _layer_route(layer, tokens, seed):
    logits = torch.nn.functional.linear(tokens.float(), layer.router.weight.float(), layer.router.bias.float())
    return route_tokens(logits, layer.top_k, renormalize=layer.top_k > 1, second_expert_policy="gumbel",
                        generator=torch.Generator().manual_seed(seed))  # CPU noise, as the layer draws it


def _layer_pytorch_path(layer, tokens, expert_ids, combine):
    out = dispatch_combine(tokens, expert_ids, combine, lambda e, x: layer.experts[e](x), layer.num_experts)
    return out if layer.meta_expert is None else out + layer.meta_expert(tokens)


@pytest.mark.parametrize("num_tokens", [2, 19])  # decode GEMV tiles; grouped tiles with a ragged block
@pytest.mark.parametrize("top_k,meta", [(1, True), (2, True), (2, False)])
def test_phi_layer_kernel_experts_match_pytorch_path(device, num_tokens, top_k, meta):
    layer = _phi_layer(top_k, meta, device=device, seed=top_k)
    tokens = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(15)).to(device)
    with torch.no_grad():
        assert dispatch.routed_supports(layer, tokens)
        expert_ids, _, combine = _layer_route(layer, tokens, seed=16)
        out = layer._kernel_experts(tokens, expert_ids, combine)
        ref = _layer_pytorch_path(layer, tokens, expert_ids, combine)  # after packing: same weights
    assert out is not None and layer.use_kernels
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_phi_layer_bf16_within_rounding(device):
    layer = _phi_layer(2, True, device=device, seed=3).to(torch.bfloat16)
    tokens = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(17)).to(device, torch.bfloat16)
    with torch.no_grad():
        expert_ids, _, combine = _layer_route(layer, tokens, seed=18)
        out = layer._kernel_experts(tokens, expert_ids, combine)
        ref = _layer_pytorch_path(layer, tokens, expert_ids, combine)
    assert out is not None and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_phi_layer_other_activation_or_training_stays_on_pytorch(device):
    """Exact-erf GELU experts are not what the kernel computes; with grad enabled nothing is offloaded."""
    layer = _phi_layer(2, True, device=device)
    tokens = torch.randn(3, HIDDEN, device=device)
    with torch.no_grad():
        assert dispatch.routed_supports(layer, tokens)
        for ex in [*layer.experts, layer.meta_expert]:
            ex.config = type(ex.config)(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu")
        assert not dispatch.routed_supports(layer, tokens)
    assert not dispatch.routed_supports(_phi_layer(2, True, device=device), tokens)  # grad enabled


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 40])
def test_cuda_phi_layer_forward_uses_kernels_with_same_routing(num_tokens):
    layer = _phi_layer(2, True, device="cuda")
    tokens = torch.randn(1, num_tokens, HIDDEN, generator=torch.Generator().manual_seed(19)).cuda()
    with torch.no_grad():
        layer.generator = torch.Generator().manual_seed(20)
        out = layer(tokens)
        rec = layer.last_routing
        assert layer.use_kernels and dispatch._PACKED_MLP_ATTR in layer.__dict__
        layer.use_kernels = False
        layer.generator = torch.Generator().manual_seed(20)
        ref = layer(tokens)
    assert torch.equal(rec.expert_ids, layer.last_routing.expert_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_benchmark_phi_smoke_runs_both_paths(capsys):
    """``benchmarks/moe_layer.py --phi --smoke``: the Phi-2 expert stage, loop vs fused, outputs agree."""
    from pathlib import Path

    from napari_medplib.testing import load_file_module

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"
    bench = load_file_module(path, "bench_moe_layer_phi")
    assert bench.main(["--smoke", "--phi"]) == 0  # 1 when fused and loop disagree beyond 1e-4
    assert capsys.readouterr().out.count("phi2-4e-top2+meta") == 3  # one prefill + two decode cases
