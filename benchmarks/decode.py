"""Whole-model decode ms/token and prefill ms for a random-weight 7B MedPLIB-like MoE model (bf16).

Measured in one run on one GPU, for the Triton MoE path (``MoEFeedForward`` dispatching to
``kernels.fused_moe``) and the PyTorch expert loop:

* prefill: ``--prefill`` tokens (default 1024, like 576 image tokens + text) into an empty KV cache,
  logits of the last position only;
* decode: ``--steps`` greedy steps at ``--prefill`` tokens of context, batch 1, ms/token;
* bandwidth floor: bytes a decode step must read (all weights except the embedding table and the
  experts not chosen, plus the KV cache at that context) / the bandwidth of a device-to-device copy
  measured in the same run; reported as floor ms and the fraction floor/measured.

Random weights: the timing does not depend on their values. Three paths: the model as written
(transformers DynamicCache, eager) with the PyTorch expert loop, the same with the Triton MoE, and
``kernels.graph_decode.StaticDecoder`` (static KV cache; on CUDA the decode step is one CUDA graph).

    python benchmarks/decode.py                       # needs a CUDA GPU (~22 GB for 7B-2e bf16)
    python benchmarks/decode.py --layers 8 --json out.json
    python benchmarks/decode.py --smoke               # CPU, tiny model, Triton interpreter: code paths only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _ms(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=1 << 30, repeats=10):
    """Bytes/s of a device-to-device copy (read + write counted)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms / 1e3)


def decode_bytes_per_token(model, context: int) -> int:
    """Weights one batch-1 decode step streams (chosen experts only) + the KV cache it reads."""
    cfg = model.config
    param_bytes = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    total = sum(param_bytes(m) for name, m in model.named_children() if name != "embed_tokens")
    for moe in model.moe_layers():
        if moe is not None:  # only top_k of the E routed experts are read per token
            top_k = moe.config.top_k if hasattr(moe, "config") else moe.top_k  # MedPLIB / Med-MoE layer
            total -= (moe.num_experts - top_k) * param_bytes(moe.experts[0])
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * elem
    return total + kv


def medplib_7b_config(layers: int = 32):
    """MedPLIB-7B's LLM shape (LLaMA-7B, 2 experts top-1 in every layer), cut to ``layers`` decoder layers."""
    from napari_medplib.model.config import MedPLIBConfig, MoEConfig

    return MedPLIBConfig(num_hidden_layers=layers, moe=MoEConfig(num_experts=2, top_k=1))


def build_random(make, device, dtype):
    """``make()`` (a module factory) built directly on ``device`` in ``dtype``, random weights, eval mode.

    Built in ``dtype`` from the start: 7B-2e in fp32 would not fit next to its bf16 copy.
    """
    import torch

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make().to(dtype).eval()
    finally:
        torch.set_default_dtype(default_dtype)


def _force_kernels(model):
    """CPU smoke only: route MoE layers through the kernels (the module hook does this on CUDA)."""
    from napari_medplib.kernels import dispatch

    def fused(moe, hidden_states):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        out, moe.last_routing = dispatch.fused_forward(moe, tokens)
        return out.view(hidden_states.shape)

    for moe in model.moe_layers():
        if moe is not None:
            moe.forward = fused.__get__(moe)


def measure(model, device, dtype, prefill, steps, repeats):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    embeds = (torch.randn(1, prefill, model.config.hidden_size, generator=gen) * 0.02).to(device, dtype)

    def do_prefill():
        return model(embeds, use_cache=True, logits_positions=slice(-1, None))

    prefill_ms = _ms(do_prefill, device, repeats)
    tokens, step_times = [], []
    out = do_prefill()
    cache = out.past_key_values
    next_id = out.logits[:, -1].argmax(-1)
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step = model(model.embed_tokens(next_id)[:, None], past_key_values=cache, use_cache=True)
        next_id = step.logits[:, -1].argmax(-1)
        _sync(device)
        step_times.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(next_id))
    warm = step_times[2:] if len(step_times) > 4 else step_times
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": statistics.median(warm), "tokens": tokens}


def measure_static(model, device, dtype, prefill, steps, repeats):
    """Same measurement through kernels.graph_decode.StaticDecoder (CUDA graph on the GPU)."""
    import torch

    from napari_medplib.kernels.graph_decode import StaticDecoder

    gen = torch.Generator(device="cpu").manual_seed(0)
    embeds = (torch.randn(1, prefill, model.config.hidden_size, generator=gen) * 0.02).to(device, dtype)
    decoder = StaticDecoder(model, max_len=prefill + steps + 8)
    prefill_ms = _ms(lambda: decoder.prefill(embeds), device, repeats)
    next_id = decoder.prefill(embeds).argmax(-1)
    tokens, step_times = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        next_id = decoder.decode_step(model.embed_tokens(next_id)[:, None]).argmax(-1)
        _sync(device)
        step_times.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(next_id))
    warm = step_times[2:] if len(step_times) > 4 else step_times  # the first step captures the graph
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": statistics.median(warm), "tokens": tokens}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model in fp32: on the GPU if present, else CPU + Triton interpreter (no timing value)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    smoke_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke and smoke_device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

    from napari_medplib.model.config import MedPLIBConfig, MoEConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    if args.smoke:  # fp32 toy run on the GPU if there is one, else CPU + interpreter
        device, dtype = smoke_device, torch.float32
        config = MedPLIBConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, moe=MoEConfig(num_experts=2, top_k=1))
        prefill, steps, repeats = 12, 3, 1
        print(f"smoke run: {device.type}, tiny model, fp32 -- timings mean nothing", flush=True)
    else:
        if not torch.cuda.is_available():
            print("decode.py needs a CUDA GPU (none found); use --smoke for a CPU check of the code paths")
            return 0
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = medplib_7b_config(args.layers)
        prefill, steps, repeats = args.prefill, args.steps, args.repeats
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  layers={args.layers}", flush=True)

    torch.manual_seed(0)
    model = build_random(lambda: MedPLIBLanguageModel(config), device, dtype)
    for moe in model.moe_layers():
        if moe is not None:
            moe.record_routing = False
    bandwidth = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 24), repeats=repeats * 2)
    floor_bytes = decode_bytes_per_token(model, prefill)
    floor_ms = floor_bytes / bandwidth * 1e3
    print(f"d2d copy bandwidth {bandwidth / 1e9:.0f} GB/s; decode reads {floor_bytes / 1e9:.2f} GB/token "
          f"at {prefill} context -> floor {floor_ms:.2f} ms/token", flush=True)

    results = {}
    with torch.inference_mode():
        for name, use_kernels, static in (("pytorch-loop", False, False), ("fused", True, False),
                                          ("fused+static" + ("+graph" if device.type == "cuda" else ""), True, True)):
            for moe in model.moe_layers():
                if moe is not None:
                    moe.use_kernels = use_kernels
            if use_kernels and device.type != "cuda":
                _force_kernels(model)
            res = (measure_static if static else measure)(model, device, dtype, prefill, steps, repeats)
            res["fraction_of_floor"] = floor_ms / res["decode_ms_per_token"]
            results[name] = res
            print(f"{name:>18}: prefill({prefill}) {res['prefill_ms']:8.2f} ms   decode {res['decode_ms_per_token']:7.3f} ms/token"
                  f"   {100 * res['fraction_of_floor']:5.1f}% of the bandwidth floor", flush=True)
    same = all(r["tokens"] == results["pytorch-loop"]["tokens"] for r in results.values())
    print(f"greedy tokens identical between the paths: {same} (bf16 on GPU may differ after a near-tie)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu-smoke",
                           "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms_per_token": floor_ms, "bytes_per_token": floor_bytes,
                           "prefill_tokens": prefill, "results": results}, fh, indent=1)
    if args.smoke and not same:
        print("MISMATCH: fp32 smoke tokens differ between the paths", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
