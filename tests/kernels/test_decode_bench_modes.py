"""benchmarks/decode.py: every mode (eager, graph, span, int8) in one smoke run, and the int8 report."""

import json
from pathlib import Path

import pytest
import torch

from napari_medplib.testing import load_file_module

pytest.importorskip("triton", reason="triton is not installed")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def _load():
    return load_file_module(BENCH, "bench_decode_modes")


def test_smoke_runs_every_mode_and_writes_the_int8_report(tmp_path, capsys):
    out_json = tmp_path / "decode.json"
    assert _load().main(["--tiny", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert set(data["results"]) == {"pytorch-loop", "fused", "fused+static+masked", "fused+static+span", "int8+static+span"}
    assert "vs fused: decode x" in out and "int8 vs float32: max |logit diff|" in out
    quality = data["int8_vs_bf16"]
    assert quality["prompts"] == 3 and 0 < quality["max_abs_logit_diff"] < 0.05
    assert quality["bytes_after"] * 2 < quality["bytes_before"]
    # the int8 floor counts int8 bytes: well under the fp32 one
    assert data["results"]["int8+static+span"]["floor_ms_per_token"] < 0.5 * data["results"]["fused"]["floor_ms_per_token"]
    assert 1.9 < data["memory"]["llm_7b_2e_bf16_bytes"] / data["memory"]["llm_7b_2e_int8_bytes"] < 2.0


def test_unknown_mode_is_refused():
    with pytest.raises(SystemExit):
        _load().main(["--tiny", "--modes", "fused,fp4"])


def test_int8_report_finds_divergence_and_margin():
    bench = _load()
    ref_logits = torch.zeros(2, 3, 5)
    ref_logits[:, :, 1] = 1.0
    ref_logits[1, 2, 2] = 0.99  # a near-tie at prompt 1, step 2
    q_logits = ref_logits.clone()
    q_logits[1, 2, 2] = 1.01
    ref_ids = ref_logits.argmax(-1)
    q_ids = torch.tensor([[1, 1, 1], [1, 1, 2]])
    rep = bench.int8_report(ref_ids, ref_logits, q_ids, q_logits)
    assert rep["greedy_identical_prompts"] == 1 and rep["prompts"] == 2
    assert rep["divergences"] == [{"prompt": 1, "step": 2, "bf16_top1_margin": pytest.approx(0.01, abs=1e-6)}]
    assert rep["max_abs_logit_diff"] == pytest.approx(0.02, abs=1e-6)
    assert rep["argmax_agreement_teacher_forced"] == pytest.approx(5 / 6)
