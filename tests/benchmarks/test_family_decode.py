"""``benchmarks/family_decode.py``: the Med-MoE / MedPLIB decode benchmark runs and reports (no timing checks)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_loader import benchmark_module

from napari_medplib.paths import bundled_model_dir


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("family_decode") as module:
        yield module


def test_tiny_pair_writes_the_report(bench, tmp_path, capsys):
    if not (bundled_model_dir() / "config.json").is_file():
        pytest.skip("no bundled model in this checkout")
    out = tmp_path / "family-decode.json"
    argv = ["--pairs", "tiny", "--image-tokens", "8", "--text-tokens", "4", "--context", "16",
            "--steps", "2", "--repeats", "1", "--warmup", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    assert "Med-MoE / MedPLIB" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["weights"] == "random"
    assert report["prompt"] == {"image_tokens": 8, "text_tokens": 4, "decode_context": 16, "decode_steps": 2,
                                "repeats": 1, "warmup": 1}
    assert set(report["models"]) == {"medmoe-tiny", "medplib-bundled"}
    for name, family in (("medmoe-tiny", "Med-MoE"), ("medplib-bundled", "MedPLIB")):
        m = report["models"][name]
        assert m["family"] == family and m["pair"] == "tiny"
        assert m["prefill_tokens"] == 12 and m["decode_context"] == 16
        assert len(m["decode_step_ms"]) == 2 and len(m["tokens"]) == 3  # warm-up step + 2 timed
        for key in ("prefill_ms", "decode_ms_per_token", "head_prefill_ms", "head_decode_ms",
                    "prefill_ms_full", "decode_ms_per_token_full", "prefill_ms_per_layer"):
            assert m[key] > 0, key
        assert m["scaled"] is False and m["prefill_ms_full"] == m["prefill_ms"]
        assert m["layers"] == m["full_layers"] == 4
    moe = report["models"]["medmoe-tiny"]
    assert (moe["moe_layers"], moe["experts"], moe["top_k"], moe["meta_expert"]) == (2, 4, 2, True)
    ratio = report["ratios"]["tiny"]
    assert (ratio["medmoe"], ratio["medplib"], ratio["scaled"]) == ("medmoe-tiny", "medplib-bundled", False)
    assert ratio["decode"] == pytest.approx(moe["decode_ms_per_token"] / report["models"]["medplib-bundled"]["decode_ms_per_token"])


@pytest.mark.parametrize("layers", [2, 8, 32])
def test_large_shapes_are_the_released_ones_cut_by_layers(bench, layers):
    """Built on the meta device: no memory, no time; checks the shapes the full-size run would time."""
    moe_cfg, plib_cfg = bench.medmoe_config("2b", layers), bench.medplib_config("7b", layers)
    moe = bench.model_stats(bench.build_model("Med-MoE", moe_cfg, torch.device("meta"), torch.float32), 1024)
    plib = bench.model_stats(bench.build_model("MedPLIB", plib_cfg, torch.device("meta"), torch.float32), 1024)
    assert (moe["hidden_size"], moe["intermediate_size"], moe["vocab_size"], moe["layers"]) == (2560, 10240, 51200, layers)
    assert moe_cfg.num_attention_heads == 32 and moe_cfg.moe_layers_idx == list(range(0, layers, 2))
    assert (moe["moe_layers"], moe["experts"], moe["top_k"], moe["meta_expert"]) == (layers // 2, 4, 2, True)
    assert (plib["hidden_size"], plib["intermediate_size"], plib["layers"]) == (4096, 11008, layers)
    assert (plib["moe_layers"], plib["experts"], plib["top_k"], plib["meta_expert"]) == (layers, 2, 1, False)
    if layers == 32:  # Phi-2 with 4 experts + meta in 16 layers; LLaMA-7B with 2 experts in all 32
        assert moe["params"] == pytest.approx(6.14e9, rel=0.01)
        assert plib["params"] == pytest.approx(11.07e9, rel=0.01)


def test_cut_runs_are_scaled_on_the_decoder_layers_only(bench):
    entry = {"prefill_ms": 10.0, "head_prefill_ms": 2.0, "decode_ms_per_token": 5.0, "head_decode_ms": 1.0}
    bench.scale_to_full(entry, built_layers=8, full_layers=32)
    assert entry["scaled"] is True
    assert entry["prefill_ms_full"] == pytest.approx(2.0 + 8.0 * 4)
    assert entry["decode_ms_per_token_full"] == pytest.approx(1.0 + 4.0 * 4)
    assert entry["decode_ms_per_token_per_layer"] == pytest.approx(0.5)


def test_odd_or_oversized_layer_counts_are_refused(bench):
    for layers in ("3", "34"):
        with pytest.raises(SystemExit):
            bench.main(["--layers", layers])
