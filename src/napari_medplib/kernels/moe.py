"""``fused_moe``: the MoE feed-forward on the GPU in four launches (route, align, gate/up, down).

PyTorch twin: ``napari_medplib.model.moe.moe_forward_reference`` (same semantics: fp32 router,
raw top-1 probability or renormalised top-k, always-on shared expert added unweighted, no drops).

Weight layouts (stacked ``nn.Linear`` weights, as the twin's experts hold them):
``router_w [E, D]``, ``router_b [E]``, ``gate_w [E, I, D]``, ``up_w [E, I, D]``, ``down_w [E, D, I]``;
``shared = (gate [I, D], up [I, D], down [D, I])``. Inner dims must be contiguous; nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import ffn
from ._runtime import (
    INTERPRET,
    SUPPORTED_DTYPES,
    KernelInputError,
    check_device,
    dot_precision,
    next_pow2,
)
from .align import align_block_size
from .records import RoutingRecord
from .routing import route


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes; GPU values are untuned defaults (tune per shape on the GPU)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    gemv_block_n: int = 64
    gemv_block_k: int = 128
    decode_max_tokens: int = 2  # at most this many tokens -> gemv path
    num_warps: int = 4
    num_stages: int = 3


def default_tiles(num_tokens: int, hidden: int, inter: int) -> TileConfig:
    if INTERPRET:  # few big tiles: the interpreter's cost is per program-iteration
        block_n = min(max(next_pow2(max(hidden, inter)), 16), 128)
        return TileConfig(16, block_n, min(max(next_pow2(hidden), 16), 128), block_n, 128, 2)
    block_m = 16 if num_tokens <= 64 else (32 if num_tokens <= 512 else 64)
    if num_tokens > 512:
        return TileConfig(block_m=block_m, block_n=128, block_k=64, num_warps=8)
    return TileConfig(block_m=block_m, block_n=64, block_k=64)


def _gemv_block_n(n: int, num_pairs: int, tiles: TileConfig) -> int:
    """Largest tile <= tiles.gemv_block_n that still gives >= ~2 waves of programs on an H100 (132 SMs):
    a decode GEMV is bandwidth-bound and needs every SM streaming weights."""
    block_n = tiles.gemv_block_n
    if INTERPRET:
        return block_n
    while block_n > 16 and triton.cdiv(n, block_n) * num_pairs < 264:
        block_n //= 2
    return block_n


def _check(x, router_w, gate_w, up_w, down_w, router_b, shared, top_k) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"fused_moe: x dtype {x.dtype} is not supported (use float32, float16 or bfloat16)")
    if gate_w.dim() != 3 or up_w.shape != gate_w.shape or down_w.dim() != 3:
        raise KernelInputError(
            "fused_moe: gate_w/up_w must be [E, I, D] and down_w [E, D, I]; got "
            f"{tuple(gate_w.shape)}, {tuple(up_w.shape)}, {tuple(down_w.shape)}"
        )
    num_experts, inter, hidden = gate_w.shape
    if x.shape[-1] != hidden or down_w.shape != (num_experts, hidden, inter) or router_w.shape != (num_experts, hidden):
        raise KernelInputError(
            f"fused_moe: shapes disagree: x [..., {x.shape[-1]}], router_w {tuple(router_w.shape)}, "
            f"gate_w {tuple(gate_w.shape)}, down_w {tuple(down_w.shape)} (expected D={hidden}, I={inter}, E={num_experts})"
        )
    for name, w in (("gate_w", gate_w), ("up_w", up_w), ("down_w", down_w)):
        if w.dtype != x.dtype or w.stride(-1) != 1 or w.stride(-2) != w.shape[-1]:
            raise KernelInputError(f"fused_moe: {name} must have x's dtype ({x.dtype}) and contiguous rows; "
                                   f"got {w.dtype} with strides {w.stride()} (call .contiguous())")
    if shared is not None:
        g, u, d = shared
        if g.shape != (inter, hidden) or u.shape != (inter, hidden) or d.shape != (hidden, inter):
            raise KernelInputError(f"fused_moe: shared weights must be ([I, D], [I, D], [D, I]) = "
                                   f"([{inter}, {hidden}], ..., [{hidden}, {inter}]); got "
                                   f"{tuple(g.shape)}, {tuple(u.shape)}, {tuple(d.shape)}")
        for name, w in (("shared gate", g), ("shared up", u), ("shared down", d)):
            if w.dtype != x.dtype or not w.is_contiguous():
                raise KernelInputError(f"fused_moe: {name} weight must be contiguous with x's dtype ({x.dtype}); "
                                       f"got {w.dtype} with strides {w.stride()}")
    if not 1 <= top_k <= num_experts:
        raise KernelInputError(f"fused_moe: need 1 <= top_k <= num_experts, got top_k={top_k}, E={num_experts}")
    check_device(x, router_w, gate_w, up_w, down_w, *(shared or ()))


def _expert_ffn(tokens, gate_w, up_w, down_w, expert_ids, weights, out_slots, slot_offset, tiles: TileConfig, gemv):
    """Run gate/up + down for pairs (token, expert_ids[token, k]) into out_slots[:, slot_offset + k]."""
    num_tokens, hidden = tokens.shape
    num_experts, inter, _ = gate_w.shape
    top_k = expert_ids.shape[1] if expert_ids is not None else 1
    num_pairs = num_tokens * top_k
    slots = out_slots.shape[1]
    out_rows = out_slots.view(-1, hidden)
    h = torch.empty(num_pairs, inter, device=tokens.device, dtype=tokens.dtype)
    has_ids = expert_ids is not None
    ids = expert_ids.reshape(-1) if has_ids else h  # dummy pointer when unused
    mul = weights is not None
    wptr = weights.reshape(-1) if mul else h
    if gemv:
        bn, bk = _gemv_block_n(inter, num_pairs, tiles), tiles.gemv_block_k
        ffn._gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, bn))](
            tokens, gate_w, up_w, h, ids, hidden, inter, tokens.stride(0), gate_w.stride(0), gate_w.stride(1),
            h.stride(0), TOP_K=top_k, HAS_IDS=has_ids, BLOCK_N=bn, BLOCK_K=bk, num_warps=tiles.num_warps)
        bn = _gemv_block_n(hidden, num_pairs, tiles)
        ffn._down_gemv_kernel[(num_pairs, triton.cdiv(hidden, bn))](
            h, down_w, out_rows, wptr, ids, inter, hidden, h.stride(0), down_w.stride(0), down_w.stride(1),
            out_rows.stride(0), TOP_K=top_k, SLOTS=slots, SLOT_OFFSET=slot_offset, HAS_IDS=has_ids,
            MUL_WEIGHT=mul, BLOCK_N=bn, BLOCK_K=bk, num_warps=tiles.num_warps)
        return
    bm = tiles.block_m
    if has_ids:
        alignment = align_block_size(expert_ids, num_experts, bm)
        sorted_ids, block_expert = alignment.sorted_ids, alignment.block_expert
    else:  # one expert for every token (the shared expert): identity order
        padded = triton.cdiv(num_pairs, bm) * bm
        sorted_ids = torch.arange(padded, device=tokens.device, dtype=torch.int32)
        block_expert = torch.zeros(padded // bm, device=tokens.device, dtype=torch.int32)
    num_blocks = block_expert.numel()
    precision = dot_precision(tokens.dtype)
    ffn._gate_up_grouped_kernel[(num_blocks, triton.cdiv(inter, tiles.block_n))](
        tokens, gate_w, up_w, h, sorted_ids, block_expert, num_pairs, hidden, inter,
        tokens.stride(0), gate_w.stride(0), gate_w.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        UPCAST=INTERPRET and tokens.dtype != torch.float32, PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    ffn._down_grouped_kernel[(num_blocks, triton.cdiv(hidden, tiles.block_n))](
        h, down_w, out_rows, wptr, sorted_ids, block_expert, num_pairs, inter, hidden,
        h.stride(0), down_w.stride(0), down_w.stride(1), out_rows.stride(0),
        TOP_K=top_k, SLOTS=slots, SLOT_OFFSET=slot_offset, MUL_WEIGHT=mul,
        BLOCK_M=bm, BLOCK_N=tiles.block_n, BLOCK_K=min(tiles.block_k, max(next_pow2(inter), 16)),
        UPCAST=INTERPRET and tokens.dtype != torch.float32, PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def fused_moe(
    x: torch.Tensor,
    router_w: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k: int = 1,
    renormalize: bool | None = None,
    router_b: torch.Tensor | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tiles: TileConfig | None = None,
    path: str = "auto",
) -> tuple[torch.Tensor, RoutingRecord]:
    """MoE FFN of x [..., D] -> (out [..., D] in x's dtype, RoutingRecord of the flattened tokens).

    ``renormalize=None`` means "only when top_k > 1" (the twin's default). ``path``: "auto"
    (gemv for at most ``tiles.decode_max_tokens`` tokens, else grouped), "gemv", "grouped", or
    "torch_grouped" (Triton routing + ``torch._grouped_mm`` experts, see ``torch_grouped.py``).
    No host synchronisation happens anywhere (CUDA-graph capturable for fixed shapes).
    """
    _check(x, router_w, gate_w, up_w, down_w, router_b, shared, top_k)
    if path not in ("auto", "gemv", "grouped", "torch_grouped"):
        raise KernelInputError(f"fused_moe: path must be 'auto', 'gemv', 'grouped' or 'torch_grouped', got {path!r}")
    batch_shape = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    num_tokens, hidden = tokens.shape
    inter = gate_w.shape[1]
    renorm = top_k > 1 if renormalize is None else bool(renormalize)
    logits, expert_ids, gate_probs, combine = route(tokens, router_w, router_b, top_k, renorm)
    if path == "torch_grouped":
        from .torch_grouped import grouped_mm_experts

        out = grouped_mm_experts(tokens, gate_w, up_w, down_w, expert_ids, combine)
        if shared is not None:
            g, u, d = shared
            out = out + torch.nn.functional.linear(torch.nn.functional.silu(tokens @ g.t()) * (tokens @ u.t()), d)
        record = RoutingRecord(logits, expert_ids.long(), gate_probs, combine)
        return out.to(x.dtype).reshape(*batch_shape, hidden), record
    tiles = tiles or default_tiles(num_tokens, hidden, inter)
    gemv = path == "gemv" or (path == "auto" and num_tokens <= tiles.decode_max_tokens)
    slots = top_k + (shared is not None)
    # one slot: written once per token, store in x's dtype; several: fp32 slots, summed after
    slot_dtype = x.dtype if slots == 1 else torch.float32
    out_slots = torch.empty(num_tokens, slots, hidden, device=tokens.device, dtype=slot_dtype)
    if num_tokens:
        _expert_ffn(tokens, gate_w, up_w, down_w, expert_ids, combine, out_slots, 0, tiles, gemv)
        if shared is not None:
            g, u, d = (w.unsqueeze(0) for w in shared)
            _expert_ffn(tokens, g, u, d, None, None, out_slots, top_k, tiles, gemv)
    out = out_slots[:, 0] if slots == 1 else out_slots.sum(dim=1).to(x.dtype)
    record = RoutingRecord(logits, expert_ids.long(), gate_probs, combine)
    return out.reshape(*batch_shape, hidden), record


def fused_experts(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    expert_ids: torch.Tensor,
    combine: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tiles: TileConfig | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """The expert stage of ``fused_moe`` with the routing chosen by the caller: x [S, D],
    ``expert_ids`` / ``combine`` [S, k] -> sum_k combine * SwiGLU_{expert_ids}(x) (+ shared) [S, D].

    For models whose routing the Triton router does not reproduce (Med-MoE's Gumbel second choice):
    they route in PyTorch and hand the choices here. ``path``: "auto", "gemv" or "grouped".
    """
    if x.dim() != 2 or expert_ids.dim() != 2 or combine.shape != expert_ids.shape or expert_ids.shape[0] != x.shape[0]:
        raise KernelInputError(f"fused_experts: need x [S, D], expert_ids and combine [S, k]; got {tuple(x.shape)}, "
                               f"{tuple(expert_ids.shape)}, {tuple(combine.shape)}")
    top_k = expert_ids.shape[1]
    router_w = torch.empty(gate_w.shape[0], gate_w.shape[2], device=x.device, dtype=x.dtype)  # shape check only
    _check(x, router_w, gate_w, up_w, down_w, None, shared, top_k)
    if path not in ("auto", "gemv", "grouped"):
        raise KernelInputError(f"fused_experts: path must be 'auto', 'gemv' or 'grouped', got {path!r}")
    check_device(expert_ids, combine)
    tokens = x if x.stride(-1) == 1 and x.stride(0) == x.shape[1] else x.contiguous()
    num_tokens, hidden = tokens.shape
    ids = expert_ids.to(torch.int32).contiguous()
    weights = combine.to(torch.float32).contiguous()
    tiles = tiles or default_tiles(num_tokens, hidden, gate_w.shape[1])
    gemv = path == "gemv" or (path == "auto" and num_tokens <= tiles.decode_max_tokens)
    slots = top_k + (shared is not None)
    out_slots = torch.zeros(num_tokens, slots, hidden, device=tokens.device, dtype=torch.float32)
    if num_tokens:
        _expert_ffn(tokens, gate_w, up_w, down_w, ids, weights, out_slots, 0, tiles, gemv)
        if shared is not None:
            g, u, d = (w.unsqueeze(0) for w in shared)
            _expert_ffn(tokens, g, u, d, None, None, out_slots, top_k, tiles, gemv)
    return out_slots.sum(dim=1).to(x.dtype)
