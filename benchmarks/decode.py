"""Whole-model decode ms/token and prefill ms for a random-weight 7B MedPLIB-like MoE model (bf16).

Measured in one run on one GPU, for these paths (``--modes``, default all):

* ``pytorch-loop``: the model as written (transformers DynamicCache, eager), PyTorch expert loop;
* ``fused``: the same with the Triton MoE (``MoEFeedForward`` dispatching to ``kernels.fused_moe``);
* ``graph``: ``kernels.graph_decode.StaticDecoder`` with ``attention="masked"`` (static KV cache, the
  decode step one CUDA graph on the GPU; attention over all ``max_len`` slots with a mask);
* ``span``: the same with ``attention="span"`` (split-K Triton attention over the written span);
* ``int8``: the model quantised in place (``model.quantize.quantize_llm(model, "int8")``: int8
  weight-only linears and MoE experts), then the ``span`` path. Runs last (the bf16 weights are gone).

For each: prefill of ``--prefill`` tokens (default 1024, like 576 image tokens + text) into an empty
KV cache, logits of the last position only; decode: ``--steps`` greedy steps at that context, batch 1,
ms/token; ratios against ``fused`` (eager). Bandwidth floor: bytes a decode step must read (all
weights except the embedding table and the experts not chosen, plus the KV cache at that context) /
the bandwidth of a device-to-device copy measured in the same run (int8 has its own, smaller floor).

int8 vs bf16 report (with ``int8``): a fixed prompt set (``--int8-prompts`` random token sequences of
``--int8-prompt-len``, seed 0) decoded greedily for ``--int8-steps`` steps by both; the max |logit
difference| along the bf16 greedy path (teacher-forced), the greedy agreement per prompt, and where
a sequence diverges, the bf16 top-1 margin at that step (a near-tie, or not). Also the LLM bytes of
the full 7B-2e (bf16 vs int8, computed on the meta device, no allocation).

Random weights: the timing does not depend on their values.

    python benchmarks/decode.py                       # needs a CUDA GPU (~22 GB for 7B-2e bf16)
    python benchmarks/decode.py --layers 8 --json out.json --modes fused,graph,span
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

    def tensor_bytes(module):
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

    # parameters + buffers (a quantised model's int8 weights are buffers); not the embedding table (one
    # row is read) nor the rotary tables (computed, tiny)
    total = sum(tensor_bytes(m) for name, m in model.named_children() if name not in ("embed_tokens", "rotary_emb"))
    for moe in model.moe_layers():
        if moe is not None:  # only top_k of the E routed experts are read per token
            top_k = moe.config.top_k if hasattr(moe, "config") else moe.top_k  # MedPLIB / Med-MoE layer
            total -= (moe.num_experts - top_k) * tensor_bytes(moe.experts) // moe.num_experts
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = model.embed_tokens.weight.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * elem
    return total + kv


def llm_bytes_7b() -> tuple[int, int]:
    """(bf16 bytes, int8 bytes) of the full MedPLIB-7b-2e LLM, built on the meta device (nothing allocated)."""
    import torch

    from napari_medplib.model.llm import MedPLIBLanguageModel
    from napari_medplib.model.quantize import quantize_llm

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = MedPLIBLanguageModel(medplib_7b_config())
    finally:
        torch.set_default_dtype(default_dtype)
    report = quantize_llm(model)
    return report.bytes_before, report.bytes_after


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
    """CPU smoke only: route MoE layers through the kernels (the module hook does this on CUDA), and the
    int8 matmuls of a quantised model through ``kernels.int8`` (the interpreter runs them)."""
    from napari_medplib.kernels import dispatch
    from napari_medplib.model.quantize import Int8Experts, Int8Linear

    def fused(moe, hidden_states):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        if isinstance(moe.experts, Int8Experts):
            res = moe.experts.fused_forward(moe, tokens)
            if res is None:  # prefill-sized: the expert loop (int8 GEMMs)
                return type(moe).forward(moe, hidden_states)
            out, moe.last_routing = res
        else:
            out, moe.last_routing = dispatch.fused_forward(moe, tokens)
        return out.view(hidden_states.shape)

    for module in model.modules():
        if isinstance(module, (Int8Linear, Int8Experts)):
            module.use_kernel = True
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


def measure_static(model, device, dtype, prefill, steps, repeats, attention="masked", span_kernel=None):
    """Same measurement through kernels.graph_decode.StaticDecoder (CUDA graph on the GPU)."""
    import torch

    from napari_medplib.kernels.graph_decode import StaticDecoder

    gen = torch.Generator(device="cpu").manual_seed(0)
    embeds = (torch.randn(1, prefill, model.config.hidden_size, generator=gen) * 0.02).to(device, dtype)
    decoder = StaticDecoder(model, max_len=prefill + steps + 8, attention=attention, span_kernel=span_kernel)
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


def prompt_set(vocab_size: int, count: int, length: int):
    """The fixed int8-vs-bf16 prompt set: ``count`` random token sequences (seed 0)."""
    import torch

    return torch.randint(3, vocab_size, (count, length), generator=torch.Generator().manual_seed(0))


def greedy_path(model, ids, steps):
    """Greedy ids [P, steps] (DynamicCache, batch of P) and the teacher-forced logits that chose them."""
    import torch

    with torch.inference_mode():
        out = model(model.embed_tokens(ids), use_cache=True, logits_positions=slice(-1, None))
        cache, nxt, chosen = out.past_key_values, out.logits[:, -1].argmax(-1), []
        for _ in range(steps):
            chosen.append(nxt)
            nxt = model(model.embed_tokens(nxt)[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    return torch.stack(chosen, 1)


def path_logits(model, ids, path_ids):
    """Logits [P, steps, V] (fp32, CPU) predicting ``path_ids`` after ``ids``, in one forward."""
    import torch

    with torch.inference_mode():
        full = torch.cat([ids, path_ids], 1)
        positions = slice(ids.shape[1] - 1, full.shape[1] - 1)
        return model(model.embed_tokens(full), logits_positions=positions).logits.float().cpu()


def int8_report(ref_ids, ref_logits, q_ids, q_logits) -> dict:
    """Max |logit diff| along the bf16 greedy path, greedy agreement per prompt, margins at divergences."""
    diff = (q_logits - ref_logits).abs()
    top2 = ref_logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]  # [P, steps]
    same = (q_ids.cpu() == ref_ids.cpu()).all(dim=1)
    divergences = []
    for row in (~same).nonzero().flatten().tolist():
        step = int((q_ids[row].cpu() != ref_ids[row].cpu()).nonzero()[0])
        divergences.append({"prompt": row, "step": step, "bf16_top1_margin": float(margins[row, step])})
    return {
        "max_abs_logit_diff": float(diff.max()), "bf16_logit_abs_max": float(ref_logits.abs().max()),
        "relative_l2": float((q_logits - ref_logits).norm() / ref_logits.norm()),
        "argmax_agreement_teacher_forced": float((q_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "greedy_identical_prompts": int(same.sum()), "prompts": int(same.numel()), "steps": int(ref_ids.shape[1]),
        "divergences": divergences,
    }


MODES = ("pytorch-loop", "fused", "graph", "span", "int8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--tiny", action="store_true",
                        help="tiny model in fp32: on the GPU if present, else CPU + Triton interpreter (no timing value)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--int8-prompts", type=int, default=8)
    parser.add_argument("--int8-prompt-len", type=int, default=64)
    parser.add_argument("--int8-steps", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {','.join(MODES)}")
    import torch

    smoke_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke and smoke_device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

    from napari_medplib.model.config import MedPLIBConfig, MoEConfig
    from napari_medplib.model.llm import MedPLIBLanguageModel

    int8_prompts, int8_len, int8_steps = args.int8_prompts, args.int8_prompt_len, args.int8_steps
    if args.smoke:  # fp32 toy run on the GPU if there is one, else CPU + interpreter
        device, dtype = smoke_device, torch.float32
        config = MedPLIBConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, moe=MoEConfig(num_experts=2, top_k=1))
        prefill, steps, repeats = 12, 3, 1
        int8_prompts, int8_len, int8_steps = 3, 6, 4
        print(f"smoke run: {device.type}, tiny model, fp32 -- timings mean nothing", flush=True)
    else:
        if not torch.cuda.is_available():
            print("decode.py needs a CUDA GPU (none found); use --smoke for a CPU check of the code paths")
            return 0
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = medplib_7b_config(args.layers)
        prefill, steps, repeats = args.prefill, args.steps, args.repeats
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  layers={args.layers}", flush=True)
    cpu_kernels = device.type != "cuda"  # smoke on CPU: force the kernels through the interpreter
    graph_word = "graph" if device.type == "cuda" else "static"  # no CUDA graph on CPU: eager static cache

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

    def set_kernels(on):
        for moe in model.moe_layers():
            if moe is not None:
                moe.use_kernels = on
        if on and cpu_kernels:
            _force_kernels(model)

    def report(name, res, floor):
        res["floor_ms_per_token"] = floor
        res["fraction_of_floor"] = floor / res["decode_ms_per_token"]
        results[name] = res
        base = results.get("fused")
        ratio = "" if base is None else (f"   vs fused: decode x{base['decode_ms_per_token'] / res['decode_ms_per_token']:.2f}"
                                        f" prefill x{base['prefill_ms'] / res['prefill_ms']:.2f}")
        print(f"{name:>22}: prefill({prefill}) {res['prefill_ms']:8.2f} ms   decode {res['decode_ms_per_token']:7.3f} ms/token"
              f"   {100 * res['fraction_of_floor']:5.1f}% of the bandwidth floor{ratio}", flush=True)

    results: dict = {}
    span_kernel = True if cpu_kernels else None
    with torch.inference_mode():
        if "pytorch-loop" in modes:
            set_kernels(False)
            report("pytorch-loop", measure(model, device, dtype, prefill, steps, repeats), floor_ms)
        set_kernels(True)
        if "fused" in modes or "int8" in modes:  # the ratios' base; int8 is compared against it
            report("fused", measure(model, device, dtype, prefill, steps, repeats), floor_ms)
        if "graph" in modes:
            report(f"fused+{graph_word}+masked",
                   measure_static(model, device, dtype, prefill, steps, repeats, "masked"), floor_ms)
        if "span" in modes:
            report(f"fused+{graph_word}+span",
                   measure_static(model, device, dtype, prefill, steps, repeats, "span", span_kernel), floor_ms)
    bf16_names = list(results)
    same = all(results[n]["tokens"] == results[bf16_names[0]]["tokens"] for n in bf16_names)
    print(f"greedy tokens identical between the paths: {same} (bf16 on GPU may differ after a near-tie)")

    quality = memory = None
    if "int8" in modes:
        from napari_medplib.model.quantize import quantize_llm

        prompts = prompt_set(config.vocab_size, int8_prompts, int8_len).to(device)
        ref_ids = greedy_path(model, prompts, int8_steps)
        ref_logits = path_logits(model, prompts, ref_ids)
        quant = quantize_llm(model, "int8")  # in place: the bf16 weights are freed
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(quant, flush=True)
        if cpu_kernels:
            _force_kernels(model)
        int8_floor_ms = decode_bytes_per_token(model, prefill) / bandwidth * 1e3
        with torch.inference_mode():
            report(f"int8+{graph_word}+span",
                   measure_static(model, device, dtype, prefill, steps, repeats, "span", span_kernel), int8_floor_ms)
        q_ids = greedy_path(model, prompts, int8_steps)
        quality = int8_report(ref_ids, ref_logits, q_ids, path_logits(model, prompts, ref_ids))
        quality.update(bytes_before=quant.bytes_before, bytes_after=quant.bytes_after)
        print(f"int8 vs {str(dtype).split('.')[-1]}: max |logit diff| {quality['max_abs_logit_diff']:.4f} "
              f"(logits |max| {quality['bf16_logit_abs_max']:.2f}, relative L2 {quality['relative_l2']:.2e}); "
              f"teacher-forced argmax agreement {100 * quality['argmax_agreement_teacher_forced']:.1f}%; greedy identical "
              f"on {quality['greedy_identical_prompts']}/{quality['prompts']} prompts x {quality['steps']} steps", flush=True)
        for d in quality["divergences"]:
            print(f"  prompt {d['prompt']} diverges at step {d['step']} (bf16 top-1 margin there {d['bf16_top1_margin']:.4f})")
        bf16_7b, int8_7b = llm_bytes_7b()
        memory = {"llm_7b_2e_bf16_bytes": bf16_7b, "llm_7b_2e_int8_bytes": int8_7b}
        print(f"MedPLIB-7b-2e LLM weights (computed): bf16 {bf16_7b / 2**30:.2f} GiB -> int8 {int8_7b / 2**30:.2f} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu-smoke",
                       "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms_per_token": floor_ms, "bytes_per_token": floor_bytes,
                       "prefill_tokens": prefill, "results": results, "int8_vs_bf16": quality, "memory": memory}, fh, indent=1)
    if args.smoke and not same:
        print("MISMATCH: fp32 smoke tokens differ between the paths", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
