"""Where the time of one decode step and one prefill goes, per op (torch.profiler), for the 7B MedPLIB LLM.

Random bf16 weights at MedPLIB-7b-2e's shape (``--layers`` decoder layers), on the GPU with the Triton
paths the model uses there: prefill of ``--prefill`` tokens into ``kernels.graph_decode.StaticDecoder``'s
static cache, then decode steps at that context run eagerly (a CUDA graph replay would show as one
launch; eager shows every kernel, whose device times are the same ones the graph replays). Warm-up
steps first (Triton compiles and autotunes outside the profile), then one profiled prefill and one
profiled decode step. Prints, for each, the top ops by self device time (self CPU time on CPU) and
writes them to ``--out`` (text tables, JSON of the top ops; Chrome traces with ``--traces``).

    python benchmarks/profile_decode.py --out prof/                 # CUDA GPU, 32 layers bf16
    python benchmarks/profile_decode.py --attention masked --int8   # the masked path / int8 weights
    python benchmarks/profile_decode.py --tiny --out /tmp/prof      # CPU, tiny model: code path only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _decode_bench():
    """benchmarks/decode.py (model builders shared with the timing benchmark), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_decode_for_profile", Path(__file__).resolve().parent / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device_time(evt) -> float:
    """Self device (CUDA) time in us, across torch versions."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def top_ops(prof, on_gpu: bool, limit: int) -> list[dict]:
    rows = []
    for evt in prof.key_averages():
        rows.append({"op": evt.key, "calls": int(evt.count), "self_device_us": _device_time(evt),
                     "self_cpu_us": float(evt.self_cpu_time_total)})
    key = "self_device_us" if on_gpu else "self_cpu_us"
    rows.sort(key=lambda r: r[key], reverse=True)
    total = sum(r[key] for r in rows) or 1.0
    for r in rows:
        r["share"] = r[key] / total
    return rows[:limit]


def profile(fn, on_gpu: bool):
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    return prof


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", "--smoke", action="store_true", help="tiny fp32 model on CPU (or the GPU if present): code path only")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--attention", choices=("span", "masked"), default="span")
    parser.add_argument("--int8", action="store_true", help="quantise the LLM first (model.quantize.quantize_llm)")
    parser.add_argument("--rows", type=int, default=25, help="ops per table")
    parser.add_argument("--out", default=None, help="folder for the tables and the top ops as JSON")
    parser.add_argument("--traces", action="store_true", help="also write Chrome traces into --out (large)")
    args = parser.parse_args(argv)
    import torch

    from napari_medplib.kernels.graph_decode import StaticDecoder
    from napari_medplib.model.config import MedPLIBConfig, MoEConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    bench = _decode_bench()
    build_random, medplib_7b_config = bench.build_random, bench.medplib_7b_config
    on_gpu = torch.cuda.is_available()
    if args.tiny:
        device, dtype = torch.device("cuda" if on_gpu else "cpu"), torch.float32
        config = MedPLIBConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, moe=MoEConfig(num_experts=2, top_k=1))
        prefill = 16
    else:
        if not on_gpu:
            print("profile_decode.py needs a CUDA GPU (none found); use --tiny for a CPU check of the code path")
            return 0
        device, dtype, config, prefill = torch.device("cuda"), torch.bfloat16, medplib_7b_config(args.layers), args.prefill
    label = (f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {str(dtype).split('.')[-1]}, "
             f"{config.num_hidden_layers} layers, prefill {prefill}, attention={args.attention}"
             + (", int8 weights" if args.int8 else ""))
    print(f"profile: {label}", flush=True)

    torch.manual_seed(0)
    model = build_random(lambda: MedPLIBLanguageModel(config), device, dtype)
    for moe in model.moe_layers():
        if moe is not None:
            moe.record_routing = False
    if args.int8:
        from napari_medplib.model.quantize import quantize_llm

        print(quantize_llm(model, "int8"), flush=True)
    gen = torch.Generator().manual_seed(0)
    embeds = (torch.randn(1, prefill, config.hidden_size, generator=gen) * 0.02).to(device, dtype)
    decoder = StaticDecoder(model, max_len=prefill + 16, use_graph=False, attention=args.attention)

    with torch.inference_mode():
        next_id = decoder.prefill(embeds).argmax(-1)  # warm-up: compile / autotune outside the profile
        for _ in range(2):
            next_id = decoder.decode_step(model.embed_tokens(next_id)[:, None]).argmax(-1)
        prof_prefill = profile(lambda: decoder.prefill(embeds), device.type == "cuda")
        next_id = decoder.prefill(embeds).argmax(-1)
        step_embeds = model.embed_tokens(next_id)[:, None]
        prof_decode = profile(lambda: decoder.decode_step(step_embeds), device.type == "cuda")

    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"setup": label}
    for name, prof in (("prefill", prof_prefill), ("decode_step", prof_decode)):
        table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows)
        print(f"\n=== {name} ({label}) ===\n{table}", flush=True)
        summary[name] = top_ops(prof, device.type == "cuda", args.rows)
        if out_dir is not None:
            (out_dir / f"profile_{name}.txt").write_text(table)
            if args.traces:
                prof.export_chrome_trace(os.fspath(out_dir / f"trace_{name}.json"))
    if out_dir is not None:
        (out_dir / "profile_top_ops.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
