"""The benchmark scripts' --smoke mode (CPU, interpreter) runs every code path and checks outputs."""

from pathlib import Path

import pytest

from napari_medplib.testing import load_file_module

pytest.importorskip("triton", reason="triton is not installed")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    return load_file_module(BENCHMARKS / f"{name}.py", f"bench_{name}")


def test_moe_layer_smoke(capsys):
    assert _load("moe_layer").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for config in ("2e-top1", "4e-top2+meta"):
        assert out.count(config) == 3  # one prefill + two decode cases each


def test_capacity_baseline_equals_loop_when_nothing_is_dropped():
    import torch

    bench = _load("moe_layer")
    from napari_medplib.model.moe import moe_forward_reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=gen)
    router_w = torch.randn(4, 16, generator=gen) * 4
    experts = [tuple(torch.randn(*s, generator=gen) for s in [(24, 16), (24, 16), (16, 24)]) for _ in range(4)]
    for top_k in (1, 2):
        ref, _ = moe_forward_reference(x, router_w, experts, None, top_k)
        torch.testing.assert_close(bench.capacity_moe(x, router_w, experts, top_k), ref, rtol=1e-4, atol=1e-4)
    # a small capacity factor drops tokens, like the reference does
    assert not torch.allclose(bench.capacity_moe(x, router_w, experts, 1, eval_capacity_factor=0.5), ref)


def test_decode_smoke(capsys):
    assert _load("decode").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens identical between the paths: True" in out and "fused" in out


def test_decode_floor_counts_only_chosen_experts():
    import torch

    bench = _load("decode")
    from napari_medplib.model.config import MedPLIBConfig, MoEConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    cfg = MedPLIBConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, moe=MoEConfig(num_experts=2, top_k=1))
    model = MedPLIBLanguageModel(cfg)
    ffn = 3 * 32 * 48 * 4  # one expert's fp32 bytes
    everything = sum(p.numel() * 4 for p in model.parameters()) - 64 * 32 * 4  # minus the embedding table
    kv = 2 * 2 * 32 * 10 * 4  # K and V, 2 layers, 10 tokens
    assert bench.decode_bytes_per_token(model, 10) == everything - 2 * ffn + kv
    del torch
