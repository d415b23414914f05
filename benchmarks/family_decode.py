"""Prefill and greedy decode of Med-MoE beside MedPLIB: random-weight language models, one run, one device.

Two pairs, each a Med-MoE model next to a MedPLIB model, all built in this process with random weights
(nothing is downloaded or read except the bundled model's ``config.json``):

* ``tiny``: Med-MoE with the dimensions of the shared ``medmoe-tiny-ref`` fixture (Phi base, hidden 64,
  4 layers, MoE in layers 0 and 2 with 4 experts + meta expert) beside MedPLIB's bundled model (its
  ``config.json``; hidden 128, 4 layers, 2 experts top-1 in every layer);
* ``large``: Med-MoE on Phi-2 as released (hidden 2560, 32 layers, 32 heads, intermediate 10240, vocab
  51200, MoE in the 16 even layers with 4 domain experts + the meta expert, top-2 by default) beside
  MedPLIB-7B (LLaMA-7B, 2 experts top-1 in all 32 layers; ``decode.medplib_7b_config``). ``--layers N``
  builds both with N decoder layers so that a small machine can hold them; the figures are then also
  given scaled to 32 layers (see below) and marked as scaled.

For each model, under ``torch.inference_mode()``, batch 1, the models' own eager code (transformers
``DynamicCache``, SDPA attention, on CUDA MedPLIB's MoE through its Triton kernels when installed,
Med-MoE's through the PyTorch loop over the chosen experts):

* prefill: a prompt of ``--image-tokens`` (576: CLIP ViT-L/14-336, the tower both families use) random
  image-token embeddings + ``--text-tokens`` embedded random text ids into an empty KV cache, logits of
  the last position; ``--warmup`` calls, then the median of ``--repeats`` calls. The vision tower and
  projector are not timed;
* decode: the cache is filled up to ``--context`` tokens, then ``--warmup`` + ``--steps`` greedy steps
  (argmax of the logits fed back); median ms/token over the ``--steps`` timed steps;
* head: the final norm + lm_head alone (over the prompt for prefill, one token for decode), so that a
  run with ``--layers N`` < 32 can be scaled honestly: full = head + (measured - head) x 32 / N. Only
  the decoder layers are scaled; with an even N Med-MoE keeps its 1:1 mix of MoE and dense layers.

Prints a table and the ratios Med-MoE / MedPLIB per pair (scaled figures where cut), and writes the
whole report with ``--json``. Timings do not depend on the weights' values, but Med-MoE's top-2
second choice is drawn with Gumbel noise (as the reference does), so which experts run varies.

    python benchmarks/family_decode.py --layers 8 --json docs/family-decode.json       # CPU, fp32
    python benchmarks/family_decode.py --device cuda --json docs/family-decode-cuda.json   # bf16, all 32 layers
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

FULL_LAYERS = 32  # Phi-2 and LLaMA-7B
PAIRS = ("tiny", "large")
_DECODE = None


def decode_helpers():
    """``benchmarks/decode.py`` (MedPLIB's decode benchmark) as a module, loaded once under a private name."""
    global _DECODE
    if _DECODE is None:
        spec = importlib.util.spec_from_file_location("_medplib_decode_bench", Path(__file__).with_name("decode.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _DECODE = module
    return _DECODE


# ---------------------------------------------------------------------------- model shapes
def medmoe_config_json(shape: str, layers: int | None = None, top_k: int = 2) -> dict:
    """A Med-MoE ``config.json`` (the fields the loader reads) for ``"tiny"`` or ``"2b"``, cut to ``layers``."""
    if shape == "tiny":  # the shared medmoe-tiny-ref fixture's dimensions
        dims = dict(vocab_size=704, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, partial_rotary_factor=0.5, bos_token_id=675, eos_token_id=675)
    elif shape == "2b":  # Phi-2 (llavaphi-2.7b-medmoe's base)
        dims = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=FULL_LAYERS,
                    num_attention_heads=32, partial_rotary_factor=0.4, bos_token_id=50256, eos_token_id=50256)
    else:
        raise ValueError(f"unknown Med-MoE shape {shape!r} (tiny, 2b)")
    if layers is not None:
        dims["num_hidden_layers"] = layers
    moe_layers = list(range(0, dims["num_hidden_layers"], 2))  # every other layer, as Med-MoE's phase-3 scripts
    return {
        "model_type": "moe_llava_phi", "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "num_key_value_heads": dims["num_attention_heads"],
        "mm_image_tower": "clip", "mm_hidden_size": 1024, "image_projector_type": "mlp2x_gelu", **dims,
        "moe": {"moe_enable": True, "moe_layers_idx": moe_layers, "num_experts": [4] * len(moe_layers),
                "top_k_experts": top_k},
    }


def medmoe_config(shape: str, layers: int | None = None, top_k: int = 2):
    """``MedMoEConfig`` through the loader's own validation; the router has a bias and a meta expert runs."""
    from napari_medplib.families.medmoe.config import MedMoEConfig

    return MedMoEConfig.from_dict(medmoe_config_json(shape, layers, top_k), source=f"medmoe-{shape}")


def medplib_config(shape: str, layers: int | None = None):
    """``"bundled"``: the bundled model's config (random weights here); ``"7b"``: MedPLIB-7B cut to ``layers``."""
    if shape == "bundled":
        from napari_medplib.model.config import MedPLIBConfig
        from napari_medplib.paths import bundled_model_dir

        return MedPLIBConfig.from_pretrained(bundled_model_dir())
    if shape == "7b":
        return decode_helpers().medplib_7b_config(layers or FULL_LAYERS)
    raise ValueError(f"unknown MedPLIB shape {shape!r} (bundled, 7b)")


def pair_specs(pair: str, layers: int | None, top_k: int) -> list[dict]:
    """The two models of a pair: name, family, how to make its config, built and full layer counts."""
    if pair == "tiny":
        return [
            dict(name="medmoe-tiny", family="Med-MoE", config=lambda: medmoe_config("tiny", top_k=top_k)),
            dict(name="medplib-bundled", family="MedPLIB", config=lambda: medplib_config("bundled")),
        ]
    if pair == "large":
        return [
            dict(name="medmoe-2b", family="Med-MoE", config=lambda: medmoe_config("2b", layers, top_k), full_layers=FULL_LAYERS),
            dict(name="medplib-7b", family="MedPLIB", config=lambda: medplib_config("7b", layers), full_layers=FULL_LAYERS),
        ]
    raise ValueError(f"unknown pair {pair!r} ({', '.join(PAIRS)})")


def build_model(family: str, config, device, dtype):
    """The family's language model (decoder only) with random weights, built directly in ``dtype``."""
    if family == "Med-MoE":
        from napari_medplib.families.medmoe.modeling import MedMoELanguageModel as Model
    else:
        from napari_medplib.model.llm import MedPLIBLanguageModel as Model
    return decode_helpers().build_random(lambda: Model(config), device, dtype)


def moe_path(family: str, device) -> str:
    if family == "MedPLIB" and device.type == "cuda":
        from napari_medplib.model.moe import _triton_dispatch

        if _triton_dispatch() is not None:
            return "Triton fused_moe"
    return "PyTorch loop over chosen experts" + (" + meta expert" if family == "Med-MoE" else "")


def model_stats(model, context: int) -> dict:
    """Parameters built, routed experts per token, and what one decode step reads at ``context``."""
    cfg = model.config
    moe = [m for m in model.moe_layers() if m is not None]
    top_k = [m.config.top_k if hasattr(m, "config") else m.top_k for m in moe]
    return {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "layers": cfg.num_hidden_layers, "moe_layers": len(moe),
        "experts": moe[0].num_experts if moe else 0, "top_k": top_k[0] if moe else 0,
        "meta_expert": any(getattr(m, "meta_expert", None) is not None or getattr(m, "shared_expert", None) is not None
                           for m in moe),
        "params": sum(p.numel() for p in model.parameters()),
        "decode_bytes_per_token": decode_helpers().decode_bytes_per_token(model, context),
    }


# ---------------------------------------------------------------------------- timing
def _timed(fn, device, warmup: int, repeats: int):
    """Median ms of ``repeats`` calls after ``warmup`` untimed ones, and the last call's result."""
    sync = decode_helpers()._sync
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def measure(model, device, dtype, image_tokens: int, text_tokens: int, context: int, steps: int,
            repeats: int, warmup: int, seed: int = 0) -> dict:
    """Prefill ms, decode ms/token at ``context`` and the head's share of each (call in inference mode)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    image = (torch.randn(1, image_tokens, hidden, generator=gen) * 0.02).to(device, dtype)
    text_ids = torch.randint(0, vocab, (1, text_tokens), generator=gen).to(device)
    prompt_len = image_tokens + text_tokens

    def prefill():
        embeds = torch.cat([image, model.embed_tokens(text_ids)], dim=1)
        return model(embeds, use_cache=True, logits_positions=slice(-1, None))

    prefill_ms, out = _timed(prefill, device, warmup, repeats)
    cache = out.past_key_values
    if context > prompt_len:  # more text up to the decode context (untimed)
        fill = (torch.randn(1, context - prompt_len, hidden, generator=gen) * 0.02).to(device, dtype)
        out = model(fill, past_key_values=cache, use_cache=True, logits_positions=slice(-1, None))
    decode_context = cache.get_seq_length()
    next_id = out.logits[:, -1].argmax(-1)
    sync = decode_helpers()._sync
    tokens, step_ms = [], []
    for _ in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step = model(model.embed_tokens(next_id)[:, None], past_key_values=cache, use_cache=True,
                     logits_positions=slice(-1, None))
        next_id = step.logits[:, -1].argmax(-1)
        sync(device)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(next_id))
    timed_steps = step_ms[warmup:] or step_ms

    states = (torch.randn(1, prompt_len, hidden, generator=gen) * 0.02).to(device, dtype)
    head_prefill_ms, _ = _timed(lambda: model.lm_head(model.norm(states)[:, -1:]).float(), device, warmup, repeats)
    head_decode_ms, _ = _timed(lambda: model.lm_head(model.norm(states[:, -1:])).float(), device, warmup,
                               max(repeats, steps))
    return {
        "prefill_tokens": prompt_len, "prefill_ms": prefill_ms,
        "decode_context": decode_context, "decode_ms_per_token": statistics.median(timed_steps),
        "decode_step_ms": step_ms[warmup:], "head_prefill_ms": head_prefill_ms, "head_decode_ms": head_decode_ms,
        "tokens": tokens,
    }


def scale_to_full(result: dict, built_layers: int, full_layers: int) -> dict:
    """``*_full`` figures: head + decoder-layer time x full / built (equal to the measured ones when not cut)."""
    factor = full_layers / built_layers
    for key, head in (("prefill_ms", "head_prefill_ms"), ("decode_ms_per_token", "head_decode_ms")):
        layers_ms = max(result[key] - result[head], 0.0)
        result[key + "_per_layer"] = layers_ms / built_layers
        result[key + "_full"] = result[key] if factor == 1 else result[head] + layers_ms * factor
    result["scaled"] = factor != 1
    result["full_layers"] = full_layers
    return result


# ---------------------------------------------------------------------------- the run
def run(device: str = "cpu", dtype: str | None = None, pairs=PAIRS, layers: int | None = None, top_k: int = 2,
        image_tokens: int = 576, text_tokens: int = 24, context: int = 1024, steps: int = 16, repeats: int = 5,
        warmup: int = 1, log=print) -> dict:
    """Build, time and free each model in turn; the report (JSON-ready dict)."""
    import torch
    import transformers

    device = torch.device(device)
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."), "weights": "random",
        "prompt": {"image_tokens": image_tokens, "text_tokens": text_tokens, "decode_context": context,
                   "decode_steps": steps, "repeats": repeats, "warmup": warmup},
        "layers": layers, "models": {}, "ratios": {},
    }
    for pair in pairs:
        figures = {}
        for spec in pair_specs(pair, layers, top_k):
            torch.manual_seed(0)
            config = spec["config"]()
            t0 = time.perf_counter()
            model = build_model(spec["family"], config, device, dtype)
            built = time.perf_counter() - t0
            log(f"{spec['name']}: built {config.num_hidden_layers} layers in {built:.1f} s; timing ...", flush=True)
            entry = {"family": spec["family"], "pair": pair, "moe_path": moe_path(spec["family"], device),
                     **model_stats(model, context)}
            with torch.inference_mode():
                entry.update(measure(model, device, dtype, image_tokens, text_tokens, context, steps, repeats, warmup))
            scale_to_full(entry, config.num_hidden_layers, spec.get("full_layers", config.num_hidden_layers))
            report["models"][spec["name"]] = entry
            figures[spec["family"]] = (spec["name"], entry)
            log(f"{spec['name']}: prefill({entry['prefill_tokens']}) {entry['prefill_ms']:.1f} ms, "
                f"decode@{entry['decode_context']} {entry['decode_ms_per_token']:.2f} ms/token", flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        (moe_name, moe), (plib_name, plib) = figures["Med-MoE"], figures["MedPLIB"]
        report["ratios"][pair] = {
            "medmoe": moe_name, "medplib": plib_name,
            "prefill": moe["prefill_ms_full"] / plib["prefill_ms_full"],
            "decode": moe["decode_ms_per_token_full"] / plib["decode_ms_per_token_full"],
            "scaled": moe["scaled"] or plib["scaled"],
        }
    return report


def format_report(report: dict) -> str:
    prompt = report["prompt"]
    lines = [
        f"{report['device']}, {report['dtype']}, {report['threads']} threads, torch {report['torch']}, random weights",
        f"prefill: {prompt['image_tokens']} image + {prompt['text_tokens']} text tokens; decode at "
        f"{prompt['decode_context']} context; median of {prompt['repeats']} prefills / {prompt['decode_steps']} "
        f"steps after {prompt['warmup']} warm-up",
        "",
        f"{'model':<16} {'layers':>6} {'params':>8} {'GB/tok':>7} {'prefill ms':>11} {'decode ms/tok':>14}"
        f" {'prefill ms (32L)':>17} {'decode ms/tok (32L)':>20}",
    ]
    for name, m in report["models"].items():
        scaled = m["scaled"]
        lines.append(
            f"{name:<16} {m['layers']:>6} {m['params'] / 1e9:>7.3f}B {m['decode_bytes_per_token'] / 1e9:>7.3f}"
            f" {m['prefill_ms']:>11.2f} {m['decode_ms_per_token']:>14.3f}"
            + (f" {m['prefill_ms_full']:>16.1f}* {m['decode_ms_per_token_full']:>19.2f}*" if scaled else "")
        )
    lines.append("")
    for pair, r in report["ratios"].items():
        lines.append(f"{pair}: Med-MoE / MedPLIB ({r['medmoe']} / {r['medplib']}): prefill {r['prefill']:.2f}, "
                     f"decode {r['decode']:.2f}" + (" (scaled to 32 layers)" if r["scaled"] else ""))
    if any(m["scaled"] for m in report["models"].values()):
        lines.append("* scaled from the layers built: head + decoder-layer time x 32 / layers (an estimate, not measured)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default, fp32) or cuda (bf16)")
    parser.add_argument("--dtype", default=None, help="override: float32, bfloat16, float16")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of the large pair (even, <= 32; default 32); figures are scaled to 32")
    parser.add_argument("--top-k", type=int, choices=(1, 2), default=2,
                        help="Med-MoE routed experts per token (2: the paper; the phase-3 scripts use 1)")
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--context", type=int, default=1024, help="KV cache length at the first timed decode step")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefills and decode steps before timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.layers is not None and not (2 <= args.layers <= FULL_LAYERS and args.layers % 2 == 0):
        parser.error("--layers must be even and in [2, 32] (Med-MoE alternates MoE and dense layers)")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU found here", file=sys.stderr)
        return 2
    report = run(args.device, args.dtype, tuple(args.pairs), args.layers, args.top_k, args.image_tokens,
                 args.text_tokens, args.context, args.steps, args.repeats, args.warmup)
    print()
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
