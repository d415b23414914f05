"""benchmarks/profile_decode.py --tiny: one profiled prefill and decode step on CPU, tables written."""

import json

import pytest
from bench_loader import benchmark_module


@pytest.mark.parametrize("extra", [["--traces"], ["--attention", "masked", "--int8"]])
def test_tiny_profile_prints_and_writes_top_ops(tmp_path, capsys, extra):
    with benchmark_module("profile_decode") as bench:
        assert bench.main(["--tiny", "--rows", "6", "--out", str(tmp_path), *extra]) == 0
    out = capsys.readouterr().out
    assert "=== prefill" in out and "=== decode_step" in out and "aten::" in out
    summary = json.loads((tmp_path / "profile_top_ops.json").read_text())
    for phase in ("prefill", "decode_step"):
        ops = summary[phase]
        assert 0 < len(ops) <= 6 and all(op["calls"] >= 1 for op in ops)
        assert ops == sorted(ops, key=lambda op: op["self_cpu_us"], reverse=True)
        assert (tmp_path / f"profile_{phase}.txt").read_text().strip()
        trace = tmp_path / f"trace_{phase}.json"
        assert json.loads(trace.read_text()) if "--traces" in extra else not trace.exists()
    if "--int8" in extra:
        assert "int8" in summary["setup"] and "attention=masked" in summary["setup"]
