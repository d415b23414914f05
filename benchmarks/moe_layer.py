"""One MoE FFN layer, three implementations timed in one run on the same GPU.

(a) ``capacity``: the reference's structure (DeepSpeed GShard-style, our own code from its
    description): fp32 gate -> softmax -> argmax one-hot -> host sync on expert counts -> capacity
    C = ceil(k*S/E * eval_cf) -> random-token-selection top-C -> dense [S, E, C] combine tensor ->
    dispatch einsum -> every expert on all C slots -> combine einsum.
(b) ``loop``: a strong PyTorch loop over experts (``model.moe.moe_forward_reference``: gather each
    expert's tokens -> 2 cuBLAS GEMMs + SiLU -> scale -> index_add).
(c) ``fused``: ``kernels.moe.fused_moe`` (Triton: route, align, gate/up+SiLU*up, down*weight).
(d) ``torch_grouped`` (extra, for choosing the prefill path): Triton routing + ``torch._grouped_mm``
    experts (``fused_moe(path="torch_grouped")``); ratios are printed for (c) and, as d/c, for (d).

Shapes: LLaMA-7B FFN (4096/11008) with MedPLIB's 2 experts top-1, and 4 experts top-2 + a shared
(meta) expert; prefill 1k/2k tokens and decode batch 1/8; bf16. Prints ms per call and the ratios
a/c and b/c, plus the max relative error of (a) and (c) against (b).

    python benchmarks/moe_layer.py                 # needs a CUDA GPU
    python benchmarks/moe_layer.py --json out.json # also write the numbers
    python benchmarks/moe_layer.py --smoke         # CPU, toy shapes, Triton interpreter: code paths only
    python benchmarks/moe_layer.py --phi           # Phi-2 Med-MoE experts instead (see below)

``--phi``: the expert stage of a Phi-2 Med-MoE layer (fc1 -> GELU(tanh) -> fc2 with biases; 4 experts
top-2 + meta expert; D=2560, I=10240 unless --hidden/--intermediate say otherwise), routing computed
once in PyTorch and handed to both: (b) ``loop`` (``kernels.moe.mlp_experts_reference``, the PyTorch
path's structure) and (c) ``fused`` (``kernels.moe.fused_mlp_experts``). Prints ms and b/c.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

CASES = [("prefill", 1024), ("prefill", 2048), ("decode", 1), ("decode", 8)]
PHI_CONFIG = {"name": "phi2-4e-top2+meta", "experts": 4, "top_k": 2, "shared": True}
CONFIGS = [{"name": "2e-top1", "experts": 2, "top_k": 1, "shared": False}, {"name": "4e-top2+meta", "experts": 4, "top_k": 2, "shared": True}]


def capacity_moe(x, router_w, experts, top_k=1, eval_capacity_factor=2.0, shared=None, generator=None):
    """(a) GShard/DeepSpeed-style dense dispatch. x [S, D]; experts[e] = (gate [I, D], up [I, D], down [D, I])."""
    import torch
    import torch.nn.functional as F

    num_tokens, num_experts = x.shape[0], router_w.shape[0]
    logits = F.linear(x.float(), router_w.float())
    gates = torch.softmax(logits, dim=-1)  # [S, E]
    capacity = math.ceil(top_k * num_tokens / num_experts * eval_capacity_factor)
    masks, scores = [], logits.clone()
    for _ in range(top_k):
        idx = scores.argmax(dim=-1)
        masks.append(F.one_hot(idx, num_experts))  # [S, E]
        scores = scores.masked_fill(masks[-1].bool(), float("-inf"))
    exp_counts = masks[0].sum(0).to("cpu")  # the per-layer device->host sync of the reference
    del exp_counts
    if top_k == 1:  # random token selection: keep a random top-C of each expert's tokens
        uniform = torch.rand(masks[0].shape, device=x.device, generator=generator)
        top_idx = torch.topk(masks[0] * uniform, k=min(capacity, num_tokens), dim=0).indices
        masks[0] = masks[0] * torch.zeros_like(masks[0]).scatter_(0, top_idx, 1)
    combine = torch.zeros(num_tokens, num_experts, capacity, device=x.device, dtype=torch.float32)
    offset = torch.zeros(num_experts, device=x.device, dtype=torch.long)
    gate_sum = sum((gates * m).sum(1) for m in masks) if top_k > 1 else None
    for mask in masks:
        locations = torch.cumsum(mask, dim=0) - 1 + offset  # [S, E]
        mask = mask * (locations < capacity)
        offset = offset + mask.sum(0)
        gate_s = (gates * mask).sum(1)  # [S]
        if gate_sum is not None:
            gate_s = gate_s / gate_sum.clamp_min(torch.finfo(torch.float32).eps)
        loc_s = (locations * mask).sum(1)  # [S]
        combine += gate_s[:, None, None] * mask[:, :, None] * F.one_hot(loc_s, capacity)[:, None, :]
    dispatch = combine.bool().to(x.dtype)
    dispatched = torch.einsum("sec,sm->ecm", dispatch, x)  # [E, C, D]
    expert_out = torch.stack(
        [F.linear(F.silu(F.linear(dispatched[e], g)) * F.linear(dispatched[e], u), d) for e, (g, u, d) in enumerate(experts)]
    )
    out = torch.einsum("sec,ecm->sm", combine.to(x.dtype), expert_out)
    if shared is not None:
        g, u, d = shared
        out = out + F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    return out


def _weights(cfg, hidden, inter, dtype, device, seed=0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) / shape[-1] ** 0.5).to(device, dtype)

    num_experts = cfg["experts"]
    w = {"router_w": rnd(num_experts, hidden).float() * 4, "gate_w": rnd(num_experts, inter, hidden),
             "up_w": rnd(num_experts, inter, hidden), "down_w": rnd(num_experts, hidden, inter)}
    w["shared"] = (rnd(inter, hidden), rnd(inter, hidden), rnd(hidden, inter)) if cfg["shared"] else None
    return w


def _timer(fn, device, warmup, iters):
    """Median ms of fn() (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


SWEEP = [{"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns}
         for bm in (16, 32, 64) for bn in (64, 128) for bk in (32, 64) for nw in (4, 8) for ns in (3, 4)]


def best_tiles(x, w, k, device, warmup, iters):
    """GPU only: time fused_moe over SWEEP tile configs (grouped path), return (best TileConfig, ms)."""
    from napari_medplib.kernels.moe import TileConfig, fused_moe

    best = (None, float("inf"))
    for params in SWEEP:
        tiles = TileConfig(**params)
        fn = functools.partial(fused_moe, x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"], top_k=k,
                               shared=w["shared"], tiles=tiles, path="grouped")
        try:
            ms = _timer(fn, device, warmup, iters)
        except Exception as err:  # e.g. out of shared memory for a big tile
            print(f"  tiles {params}: failed ({type(err).__name__})")
            continue
        best = min(best, (tiles, ms), key=lambda t: t[1])
    return best


def _implementations(x, w, experts, k):
    """name -> zero-argument callable for one input (closures bound here, not to loop variables)."""
    from napari_medplib.kernels.moe import fused_moe
    from napari_medplib.model.moe import moe_forward_reference

    stacked = (x, w["router_w"], w["gate_w"], w["up_w"], w["down_w"])
    return {
        "capacity": lambda: capacity_moe(x, w["router_w"], experts, k, shared=w["shared"]),
        "loop": lambda: moe_forward_reference(x, w["router_w"], experts, None, k, None, w["shared"])[0],
        "fused": lambda: fused_moe(*stacked, top_k=k, shared=w["shared"])[0],
        "torch_grouped": lambda: fused_moe(*stacked, top_k=k, shared=w["shared"], path="torch_grouped")[0],
    }


def run(hidden, inter, cases, device, dtype, warmup, iters, sweep=False):
    import torch


    rows = []
    for cfg in CONFIGS:
        w = _weights(cfg, hidden, inter, dtype, device)
        experts = [(w["gate_w"][e], w["up_w"][e], w["down_w"][e]) for e in range(cfg["experts"])]
        k = cfg["top_k"]
        for phase, num_tokens in cases:
            x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
            impls = _implementations(x, w, experts, k)
            with torch.no_grad():
                outs = {name: fn() for name, fn in impls.items()}
                ref = outs["loop"].float()
                errs = {name: ((o.float() - ref).norm() / ref.norm()).item() for name, o in outs.items()}
                ms = {name: _timer(fn, device, warmup, iters) for name, fn in impls.items()}
            row = {"config": cfg["name"], "phase": phase, "tokens": num_tokens, "ms": ms, "rel_err_vs_loop": errs,
                       "speedup_vs_capacity": ms["capacity"] / ms["fused"], "speedup_vs_loop": ms["loop"] / ms["fused"]}
            if sweep and phase == "prefill":
                tiles, tuned_ms = best_tiles(x, w, k, device, warmup, iters)
                row["tuned"] = {"tiles": tiles.__dict__ if tiles else None, "ms": tuned_ms}
                print(f"  tuned grouped tiles {row['tuned']['tiles']}: {tuned_ms:.3f} ms", flush=True)
            rows.append(row)
            print(f"{cfg['name']:>13} {phase:>7} S={num_tokens:<5} capacity {ms['capacity']:9.3f} ms  loop {ms['loop']:9.3f} ms"
                  f"  fused {ms['fused']:9.3f} ms  grouped_mm {ms['torch_grouped']:9.3f} ms  a/c {row['speedup_vs_capacity']:5.2f}x  b/c {row['speedup_vs_loop']:5.2f}x"
                  f"  d/c {ms['torch_grouped'] / ms['fused']:5.2f}x  err(a) {errs['capacity']:.1e} err(c) {errs['fused']:.1e}"
                  f" err(d) {errs['torch_grouped']:.1e}", flush=True)
    return rows


def _phi_weights(cfg, hidden, inter, dtype, device, seed=0):
    """Phi-2 expert weights in fused_mlp_experts' layout (fc1_w [E, I, D], fc1_b [E, I], fc2_w [E, D, I],
    fc2_b [E, D]) + the meta expert, biases nonzero."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device, dtype)

    num_experts = cfg["experts"]
    w = {"router_w": rnd(num_experts, hidden, scale=4 / hidden**0.5).float(),
         "fc1_w": rnd(num_experts, inter, hidden, scale=hidden**-0.5), "fc1_b": rnd(num_experts, inter, scale=0.1),
         "fc2_w": rnd(num_experts, hidden, inter, scale=inter**-0.5), "fc2_b": rnd(num_experts, hidden, scale=0.1)}
    w["shared"] = (rnd(inter, hidden, scale=hidden**-0.5), rnd(inter, scale=0.1),
                   rnd(hidden, inter, scale=inter**-0.5), rnd(hidden, scale=0.1)) if cfg["shared"] else None
    return w


def run_phi(hidden, inter, cases, device, dtype, warmup, iters):
    """Rows like ``run``'s for the Phi-2 expert stage: loop vs fused, same routing for both."""
    import torch

    from napari_medplib.kernels.moe import fused_mlp_experts, mlp_experts_reference
    from napari_medplib.model.moe import route_tokens

    cfg = PHI_CONFIG
    w = _phi_weights(cfg, hidden, inter, dtype, device)
    stacked = (w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"])
    rows = []
    for phase, num_tokens in cases:
        x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
        ids, _, combine = route_tokens(x.float() @ w["router_w"].t(), cfg["top_k"], renormalize=True)
        args = (x, *stacked, ids, combine)
        impls = {"loop": functools.partial(mlp_experts_reference, *args, shared=w["shared"]),
                 "fused": functools.partial(fused_mlp_experts, *args, shared=w["shared"])}
        with torch.no_grad():
            outs = {name: fn() for name, fn in impls.items()}
            ref = outs["loop"].float()
            errs = {name: ((o.float() - ref).norm() / ref.norm()).item() for name, o in outs.items()}
            ms = {name: _timer(fn, device, warmup, iters) for name, fn in impls.items()}
        row = {"config": cfg["name"], "phase": phase, "tokens": num_tokens, "ms": ms, "rel_err_vs_loop": errs,
               "speedup_vs_loop": ms["loop"] / ms["fused"]}
        rows.append(row)
        print(f"{cfg['name']:>17} {phase:>7} S={num_tokens:<5} loop {ms['loop']:9.3f} ms  fused {ms['fused']:9.3f} ms"
              f"  b/c {row['speedup_vs_loop']:5.2f}x  err(c) {errs['fused']:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy shapes in fp32: on the GPU if present, else CPU + Triton interpreter (no timing value)")
    parser.add_argument("--phi", action="store_true", help="time Phi-2 Med-MoE's GELU experts (4 experts top-2 + meta) instead")
    parser.add_argument("--hidden", type=int, default=None, help="default 4096, with --phi 2560")
    parser.add_argument("--intermediate", type=int, default=None, help="default 11008, with --phi 10240")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--sweep", action="store_true", help="GPU: also time a grid of tile configs for prefill")
    args = parser.parse_args(argv)

    import torch

    smoke_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke and smoke_device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

    if args.smoke:  # fp32 toy run on the GPU if there is one, else CPU + interpreter
        device, dtype = smoke_device, torch.float32
        hidden, inter, cases, warmup, iters = 64, 96, [("prefill", 40), ("decode", 1), ("decode", 3)], 0, 1
        print(f"smoke run: {device.type}, toy shapes, fp32 -- timings mean nothing", flush=True)
    else:
        if not torch.cuda.is_available():
            print("moe_layer.py needs a CUDA GPU (none found); use --smoke for a CPU check of the code paths")
            return 0
        device, dtype = torch.device("cuda"), torch.bfloat16
        hidden = args.hidden or (2560 if args.phi else 4096)
        inter = args.intermediate or (10240 if args.phi else 11008)
        cases, warmup, iters = CASES, args.warmup, args.iters
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  D={hidden} I={inter}", flush=True)
    if args.phi:
        rows = run_phi(hidden, inter, cases, device, dtype, warmup, iters)
    else:
        rows = run(hidden, inter, cases, device, dtype, warmup, iters, sweep=args.sweep and device.type == "cuda")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu-smoke"), "rows": rows}, fh, indent=1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    bad = [r for r in rows if max(r["rel_err_vs_loop"].values()) > tol]
    if bad:
        print(f"MISMATCH: {len(bad)} case(s) disagree with the loop baseline beyond {tol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
