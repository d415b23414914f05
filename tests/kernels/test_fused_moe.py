"""fused_moe (route -> align -> gate/up+SiLU*up -> down*weight) vs ``moe_forward_reference``."""

import pytest
import torch

from napari_medplib.model.moe import moe_forward_reference

kmoe = pytest.importorskip("napari_medplib.kernels.moe", reason="triton is not installed")
from kernel_helpers import experts_list, moe_weights, rel_err  # noqa: E402

HIDDEN, INTER = 64, 96


def _run(device, num_tokens, num_experts, top_k, bias, shared, dtype=torch.float32, path="auto", seed=0):
    w = moe_weights(num_experts, HIDDEN, INTER, dtype, device, seed, bias, shared)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    out, rec = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=top_k,
                              router_b=w["router_b"], shared=w["shared"], path=path)
    ref, ref_rec = moe_forward_reference(x, w["router_w"], experts_list(w), w["router_b"], top_k, None, w["shared"])
    return out, rec, ref, ref_rec


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 2)])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_path_fp32_matches_twin(device, num_experts, top_k, shared, bias):
    out, rec, ref, ref_rec = _run(device, 40, num_experts, top_k, bias, shared, path="grouped")
    assert torch.equal(rec.expert_ids, ref_rec.expert_ids)
    torch.testing.assert_close(rec.combine_weights, ref_rec.combine_weights)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_experts,top_k,shared", [(2, 1, False), (4, 2, True), (4, 1, True)])
def test_torch_grouped_mm_path_matches_twin(device, num_experts, top_k, shared):
    out, rec, ref, ref_rec = _run(device, 29, num_experts, top_k, True, shared, path="torch_grouped")
    assert torch.equal(rec.expert_ids, ref_rec.expert_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out16, _, ref16, _ = _run(device, 29, num_experts, top_k, False, shared, dtype=torch.bfloat16, path="torch_grouped")
    assert out16.dtype == torch.bfloat16 and rel_err(out16, ref16) < 2e-2


@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("num_experts,top_k,shared", [(2, 1, False), (4, 2, True)])
def test_decode_gemv_path_fp32_matches_twin(device, num_tokens, num_experts, top_k, shared):
    out, rec, ref, ref_rec = _run(device, num_tokens, num_experts, top_k, True, shared, path="auto")
    assert torch.equal(rec.expert_ids, ref_rec.expert_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["grouped", "gemv"])
@pytest.mark.parametrize("top_k,shared", [(1, False), (2, True)])
def test_small_tiles_loop_over_k_and_n_with_masked_tails(device, path, top_k, shared):
    """hidden 40 / intermediate 56 with 16-wide tiles: several K steps and N tiles, ragged edges."""
    hidden, inter = 40, 56
    w = moe_weights(4, hidden, inter, torch.float32, device, seed=9, bias=True, shared=shared)
    num_tokens = 23 if path == "grouped" else 3  # gemv: one program per (pair, N-tile), keep it small
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(10)).to(device)
    tiles = kmoe.TileConfig(block_m=16, block_n=16, block_k=16, gemv_block_n=16, gemv_block_k=16)
    out, rec = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=top_k,
                              router_b=w["router_b"], shared=w["shared"], tiles=tiles, path=path)
    ref, ref_rec = moe_forward_reference(x, w["router_w"], experts_list(w), w["router_b"], top_k, None, w["shared"])
    assert torch.equal(rec.expert_ids, ref_rec.expert_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_half_precision_within_rounding_noise(device, dtype, path):
    out, rec, ref, ref_rec = _run(device, 24, 4, 2, False, True, dtype=dtype, path=path, seed=3)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(rec.expert_ids, ref_rec.expert_ids)
    assert rel_err(out, ref) < 2e-2  # twin rounds every intermediate to bf16/fp16; we keep fp32


@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_reads_only_the_chosen_experts_weights(device, path):
    """Poison every expert no token chose: the output must not see it."""
    w = moe_weights(4, HIDDEN, INTER, torch.float32, device, seed=5)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(6)).to(device)
    _, rec = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=1, path=path)
    unused = sorted(set(range(4)) - set(rec.expert_ids.flatten().tolist()))
    assert unused
    clean, _ = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=1, path=path)
    for name in ("gate_w", "up_w", "down_w"):
        w[name][unused] = float("nan")
    out, _ = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=1, path=path)
    assert torch.equal(out, clean)


def test_top1_is_not_renormalised_and_batch_shape_is_kept(device):
    w = moe_weights(2, HIDDEN, INTER, torch.float32, device, seed=7)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(8)).to(device)
    out, rec = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"])
    assert out.shape == x.shape
    assert (rec.combine_weights < 1).any() and torch.equal(rec.combine_weights, rec.gate_probs)
    ref, _ = moe_forward_reference(x.reshape(-1, HIDDEN), w["router_w"], experts_list(w))
    torch.testing.assert_close(out.reshape(-1, HIDDEN), ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_problem(device):
    w = moe_weights(2, HIDDEN, INTER, torch.float32, device)
    x = torch.randn(3, HIDDEN, device=device)
    with pytest.raises(ValueError, match="gate_w/up_w must be"):
        kmoe.fused_moe(x, w["router_w"], w["gate_w"][0], w["up_w"], w["down_w"])
    with pytest.raises(ValueError, match="dtype"):
        kmoe.fused_moe(x, w["router_w"], w["gate_w"].double(), w["up_w"].double(), w["down_w"].double())
    with pytest.raises(ValueError, match="contiguous"):
        kmoe.fused_moe(x, w["router_w"], w["gate_w"].transpose(1, 2).contiguous().transpose(1, 2), w["up_w"], w["down_w"])
    with pytest.raises(ValueError, match="shared weights"):
        kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], shared=(w["down_w"][0],) * 3)
    bad_shared = (w["gate_w"][0].t().contiguous().t(), w["up_w"][0], w["down_w"][0])
    with pytest.raises(ValueError, match="shared gate weight must be contiguous"):
        kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], shared=bad_shared)
    with pytest.raises(ValueError, match="path"):
        kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], path="fast")
