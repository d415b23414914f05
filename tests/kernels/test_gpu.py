"""bf16 at larger shapes on a real GPU (skipped without CUDA)."""

import pytest
import torch

from napari_medplib.model.config import MoEConfig
from napari_medplib.model.moe import MoEFeedForward, moe_forward_reference

kmoe = pytest.importorskip("napari_medplib.kernels.moe", reason="triton is not installed")
from kernel_helpers import experts_list, moe_weights, rel_err  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("num_tokens", [1, 8, 300, 1024])
@pytest.mark.parametrize("num_experts,top_k,shared", [(2, 1, False), (4, 2, True)])
def test_bf16_large_matches_twin(num_tokens, num_experts, top_k, shared):
    w = moe_weights(num_experts, 1024, 2816, torch.bfloat16, "cuda", seed=num_tokens, shared=shared)
    x = torch.randn(num_tokens, 1024, device="cuda", dtype=torch.bfloat16)
    out, rec = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=top_k, shared=w["shared"])
    ref, ref_rec = moe_forward_reference(x, w["router_w"], experts_list(w), None, top_k, None, w["shared"])
    assert (rec.expert_ids == ref_rec.expert_ids).float().mean() > 0.99  # fp32 sum order may flip near-ties
    assert rel_err(out, ref) < 2e-2


def test_fp32_gpu_is_ieee_exact_enough():
    w = moe_weights(2, 512, 1024, torch.float32, "cuda", seed=1)
    x = torch.randn(200, 512, device="cuda")
    out, _ = kmoe.fused_moe(x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"])
    ref, _ = moe_forward_reference(x, w["router_w"], experts_list(w))
    assert rel_err(out, ref) < 1e-5  # would be ~1e-3 if tl.dot fell back to TF32


def test_module_dispatches_to_kernels_on_cuda(monkeypatch):
    from napari_medplib.kernels import dispatch

    torch.manual_seed(0)
    moe = MoEFeedForward(256, 512, MoEConfig(num_experts=2)).eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 33, 256, device="cuda", dtype=torch.bfloat16)
    calls = []
    original = dispatch.fused_forward
    monkeypatch.setattr(dispatch, "fused_forward", lambda m, t: calls.append(1) or original(m, t))
    with torch.no_grad():
        fused = moe(x)
        moe.use_kernels = False
        eager = moe(x)
    assert calls and rel_err(fused, eager) < 2e-2


def test_e2e_greedy_tokens_identical_fp32_7b_dims():
    """Random model at 7B layer dims (2 layers to stay small), fp32: Triton path == PyTorch path."""
    from napari_medplib.model.config import MedPLIBConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    torch.manual_seed(0)
    cfg = MedPLIBConfig(num_hidden_layers=2, moe=MoEConfig(num_experts=2, top_k=1))
    with torch.device("cuda"):
        model = MedPLIBLanguageModel(cfg).eval()
    embeds = torch.randn(1, 300, cfg.hidden_size, device="cuda") * 0.02

    def greedy(use_kernels, steps=16):
        for moe in model.moe_layers():
            moe.use_kernels = use_kernels
        with torch.inference_mode():
            out = model(embeds, use_cache=True, logits_positions=slice(-1, None))
            cache, ids = out.past_key_values, [out.logits[:, -1].argmax(-1)]
            for _ in range(steps - 1):
                step = model(model.embed_tokens(ids[-1])[:, None], past_key_values=cache, use_cache=True)
                ids.append(step.logits[:, -1].argmax(-1))
        return torch.stack(ids, 1)

    assert torch.equal(greedy(True), greedy(False))
