"""``fused_moe``: the MoE feed-forward on the GPU in four launches (route, align, gate/up, down).

PyTorch twin: ``napari_medplib.model.moe.moe_forward_reference`` (same semantics: fp32 router,
raw top-1 probability or renormalised top-k, always-on shared expert added unweighted, no drops).

Weight layouts (stacked ``nn.Linear`` weights, as the twin's experts hold them):
``router_w [E, D]``, ``router_b [E]``, ``gate_w [E, I, D]``, ``up_w [E, I, D]``, ``down_w [E, D, I]``;
``shared = (gate [I, D], up [I, D], down [D, I])``. Inner dims must be contiguous; nothing is copied.

Also here: ``fused_experts`` (the expert stage alone, routing chosen by the caller) and its non-gated
sibling ``fused_mlp_experts`` (fc1 -> GELU(tanh) -> fc2 with biases, Phi-2's experts; PyTorch twin
``mlp_experts_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


def _pair_blocks(expert_ids, num_experts: int, num_pairs: int, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids, block_expert) for the grouped kernels: pairs sorted by expert in M-blocks, or, without
    ``expert_ids`` (the shared expert: one expert for every token), the identity order in expert 0's blocks."""
    if expert_ids is not None:
        alignment = align_block_size(expert_ids, num_experts, block_m)
        return alignment.sorted_ids, alignment.block_expert
    padded = triton.cdiv(num_pairs, block_m) * block_m
    sorted_ids = torch.arange(padded, device=device, dtype=torch.int32)
    return sorted_ids, torch.zeros(padded // block_m, device=device, dtype=torch.int32)


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
    sorted_ids, block_expert = _pair_blocks(expert_ids, num_experts, num_pairs, bm, tokens.device)
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


# ---------------------------------------------------------------------------- GELU(tanh) MLP experts
# Phi-2's experts are not gated: MLP(x) = gelu_tanh(x W1^T + b1) W2^T + b2, with ``fc1_w [E, I, D]``,
# ``fc1_b [E, I]``, ``fc2_w [E, D, I]``, ``fc2_b [E, D]`` (stacked ``nn.Linear`` weights, biases optional).
# Same two paths, slots and tiles as the SwiGLU kernels in ``ffn.py``; one GEMM fewer in the first stage,
# and the second stage adds b2 before the routing weight (the twin scales the whole expert output).
MLP_ACTIVATIONS = ("gelu_tanh",)


@triton.jit
def _gelu_tanh(x):
    """0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): only exp needed, so the
    same code runs on the GPU and under the interpreter (fp32 in, fp32 out)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _fc1_gelu_grouped_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_be, stride_ht,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_mask = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    w_base = expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        a = tl.load(x_ptr + token[:, None] * stride_xt + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [M, K]
        b = tl.load(w_ptr + w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [K, N] view of W1[e]^T
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    h = _gelu_tanh(acc)
    h_off = pair[:, None].to(tl.int64) * stride_ht + offs_n[None, :]
    tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _fc2_grouped_kernel(
    h_ptr, w_ptr, b_ptr, out_ptr, weight_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, inter, hidden,
    stride_ht, stride_we, stride_wn, stride_be, stride_ot,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, SLOT_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_mask = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    w_base = expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < inter
        a = tl.load(h_ptr + pair[:, None].to(tl.int64) * stride_ht + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [M, K]
        b = tl.load(w_ptr + w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [K, N] view of W2[e]^T
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pair, mask=row_mask, other=0.0)[:, None]
    out_row = (pair // TOP_K).to(tl.int64) * SLOTS + pair % TOP_K + SLOT_OFFSET
    tl.store(out_ptr + out_row[:, None] * stride_ot + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _fc1_gelu_gemv_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, ids_ptr,
    hidden, inter, stride_xt, stride_we, stride_wn, stride_be, stride_ht,
    TOP_K: tl.constexpr, HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    token = (pair // TOP_K).to(tl.int64)
    expert = 0
    if HAS_IDS:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    w_base = expert * stride_we
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        x = tl.load(x_ptr + token * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + w_base + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [N, K] rows of W1[e]
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    h = _gelu_tanh(acc)
    tl.store(h_ptr + pair.to(tl.int64) * stride_ht + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _fc2_gemv_kernel(
    h_ptr, w_ptr, b_ptr, out_ptr, weight_ptr, ids_ptr,
    inter, hidden, stride_ht, stride_we, stride_wn, stride_be, stride_ot,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, SLOT_OFFSET: tl.constexpr, HAS_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = 0
    if HAS_IDS:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    w_base = expert * stride_we
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < inter
        h = tl.load(h_ptr + pair.to(tl.int64) * stride_ht + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + w_base + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [N, K] rows of W2[e]
        acc += tl.sum(w * h[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pair)
    out_row = (pair // TOP_K).to(tl.int64) * SLOTS + pair % TOP_K + SLOT_OFFSET
    tl.store(out_ptr + out_row * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _check_mlp(x, fc1_w, fc1_b, fc2_w, fc2_b, shared, top_k) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"fused_mlp_experts: x dtype {x.dtype} is not supported (use float32, float16 or bfloat16)")
    if fc1_w.dim() != 3 or fc2_w.dim() != 3:
        raise KernelInputError(f"fused_mlp_experts: fc1_w must be [E, I, D] and fc2_w [E, D, I]; got "
                               f"{tuple(fc1_w.shape)}, {tuple(fc2_w.shape)}")
    num_experts, inter, hidden = fc1_w.shape
    wanted = {"fc1_w": (num_experts, inter, hidden), "fc1_b": (num_experts, inter),
              "fc2_w": (num_experts, hidden, inter), "fc2_b": (num_experts, hidden)}
    given = {"fc1_w": fc1_w, "fc1_b": fc1_b, "fc2_w": fc2_w, "fc2_b": fc2_b}
    if shared is not None:
        if len(shared) != 4:
            raise KernelInputError("fused_mlp_experts: shared must be (fc1_w [I, D], fc1_b [I] or None, "
                                   "fc2_w [D, I], fc2_b [D] or None)")
        wanted.update({"shared fc1_w": (inter, hidden), "shared fc1_b": (inter,),
                       "shared fc2_w": (hidden, inter), "shared fc2_b": (hidden,)})
        given.update(zip(("shared fc1_w", "shared fc1_b", "shared fc2_w", "shared fc2_b"), shared, strict=True))
    if x.shape[-1] != hidden:
        raise KernelInputError(f"fused_mlp_experts: x [..., {x.shape[-1]}] does not match fc1_w's D={hidden}")
    for name, w in given.items():
        if w is None:
            continue
        if w.shape != wanted[name]:
            raise KernelInputError(f"fused_mlp_experts: {name} must be {list(wanted[name])} "
                                   f"(E={num_experts}, I={inter}, D={hidden}); got {list(w.shape)}")
        if w.dtype != x.dtype or not w.is_contiguous():
            raise KernelInputError(f"fused_mlp_experts: {name} must be contiguous with x's dtype ({x.dtype}); "
                                   f"got {w.dtype} with strides {w.stride()} (call .contiguous())")
    if not 1 <= top_k <= num_experts:
        raise KernelInputError(f"fused_mlp_experts: need 1 <= top_k <= num_experts, got top_k={top_k}, E={num_experts}")
    check_device(x, *(w for w in given.values() if w is not None))


def _mlp_ffn(tokens, fc1_w, fc1_b, fc2_w, fc2_b, expert_ids, weights, out_slots, slot_offset,
             tiles: TileConfig, gemv) -> None:
    """Run fc1+GELU and fc2 for pairs (token, expert_ids[token, k]) into out_slots[:, slot_offset + k]."""
    num_tokens, hidden = tokens.shape
    num_experts, inter, _ = fc1_w.shape
    top_k = expert_ids.shape[1] if expert_ids is not None else 1
    num_pairs = num_tokens * top_k
    slots = out_slots.shape[1]
    out_rows = out_slots.view(-1, hidden)
    h = torch.empty(num_pairs, inter, device=tokens.device, dtype=tokens.dtype)  # [pairs, I]
    has_ids = expert_ids is not None
    ids = expert_ids.reshape(-1) if has_ids else h  # dummy pointer when unused
    mul = weights is not None
    wptr = weights.reshape(-1) if mul else h
    b1 = fc1_b if fc1_b is not None else h
    b2 = fc2_b if fc2_b is not None else h
    stride_b1 = fc1_b.stride(0) if fc1_b is not None else 0
    stride_b2 = fc2_b.stride(0) if fc2_b is not None else 0
    if gemv:
        bn, bk = _gemv_block_n(inter, num_pairs, tiles), tiles.gemv_block_k
        _fc1_gelu_gemv_kernel[(num_pairs, triton.cdiv(inter, bn))](
            tokens, fc1_w, b1, h, ids, hidden, inter, tokens.stride(0), fc1_w.stride(0), fc1_w.stride(1),
            stride_b1, h.stride(0), TOP_K=top_k, HAS_IDS=has_ids, HAS_BIAS=fc1_b is not None,
            BLOCK_N=bn, BLOCK_K=bk, num_warps=tiles.num_warps)
        bn = _gemv_block_n(hidden, num_pairs, tiles)
        _fc2_gemv_kernel[(num_pairs, triton.cdiv(hidden, bn))](
            h, fc2_w, b2, out_rows, wptr, ids, inter, hidden, h.stride(0), fc2_w.stride(0), fc2_w.stride(1),
            stride_b2, out_rows.stride(0), TOP_K=top_k, SLOTS=slots, SLOT_OFFSET=slot_offset, HAS_IDS=has_ids,
            HAS_BIAS=fc2_b is not None, MUL_WEIGHT=mul, BLOCK_N=bn, BLOCK_K=bk, num_warps=tiles.num_warps)
        return
    bm = tiles.block_m
    sorted_ids, block_expert = _pair_blocks(expert_ids, num_experts, num_pairs, bm, tokens.device)
    num_blocks = block_expert.numel()
    precision = dot_precision(tokens.dtype)
    upcast = INTERPRET and tokens.dtype != torch.float32
    _fc1_gelu_grouped_kernel[(num_blocks, triton.cdiv(inter, tiles.block_n))](
        tokens, fc1_w, b1, h, sorted_ids, block_expert, num_pairs, hidden, inter,
        tokens.stride(0), fc1_w.stride(0), fc1_w.stride(1), stride_b1, h.stride(0),
        TOP_K=top_k, HAS_BIAS=fc1_b is not None, BLOCK_M=bm, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        UPCAST=upcast, PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    _fc2_grouped_kernel[(num_blocks, triton.cdiv(hidden, tiles.block_n))](
        h, fc2_w, b2, out_rows, wptr, sorted_ids, block_expert, num_pairs, inter, hidden,
        h.stride(0), fc2_w.stride(0), fc2_w.stride(1), stride_b2, out_rows.stride(0),
        TOP_K=top_k, SLOTS=slots, SLOT_OFFSET=slot_offset, HAS_BIAS=fc2_b is not None, MUL_WEIGHT=mul,
        BLOCK_M=bm, BLOCK_N=tiles.block_n, BLOCK_K=min(tiles.block_k, max(next_pow2(inter), 16)),
        UPCAST=upcast, PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def fused_mlp_experts(
    x: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor | None,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor | None,
    expert_ids: torch.Tensor,
    combine: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None,
    activation: str = "gelu_tanh",
    tiles: TileConfig | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``fused_experts`` for non-gated experts (Phi-2's fc1 -> gelu_new -> fc2, with biases): x [S, D],
    ``expert_ids`` / ``combine`` [S, k] -> sum_k combine * MLP_{expert_ids}(x) (+ shared MLP, unweighted) [S, D].

    ``shared`` = (fc1_w [I, D], fc1_b [I], fc2_w [D, I], fc2_b [D]); any bias may be None. Only
    ``activation="gelu_tanh"`` exists. PyTorch twin: ``mlp_experts_reference``. No host synchronisation.
    """
    if x.dim() != 2 or expert_ids.dim() != 2 or combine.shape != expert_ids.shape or expert_ids.shape[0] != x.shape[0]:
        raise KernelInputError(f"fused_mlp_experts: need x [S, D], expert_ids and combine [S, k]; got "
                               f"{tuple(x.shape)}, {tuple(expert_ids.shape)}, {tuple(combine.shape)}")
    if activation not in MLP_ACTIVATIONS:
        raise KernelInputError(f"fused_mlp_experts: activation must be one of {MLP_ACTIVATIONS}, got {activation!r}")
    if path not in ("auto", "gemv", "grouped"):
        raise KernelInputError(f"fused_mlp_experts: path must be 'auto', 'gemv' or 'grouped', got {path!r}")
    top_k = expert_ids.shape[1]
    _check_mlp(x, fc1_w, fc1_b, fc2_w, fc2_b, shared, top_k)
    check_device(expert_ids, combine)
    tokens = x if x.stride(-1) == 1 and x.stride(0) == x.shape[1] else x.contiguous()
    num_tokens, hidden = tokens.shape
    ids = expert_ids.to(torch.int32).contiguous()
    weights = combine.to(torch.float32).contiguous()
    tiles = tiles or default_tiles(num_tokens, hidden, fc1_w.shape[1])
    gemv = path == "gemv" or (path == "auto" and num_tokens <= tiles.decode_max_tokens)
    slots = top_k + (shared is not None)
    out_slots = torch.zeros(num_tokens, slots, hidden, device=tokens.device, dtype=torch.float32)  # [S, slots, D]
    if num_tokens:
        _mlp_ffn(tokens, fc1_w, fc1_b, fc2_w, fc2_b, ids, weights, out_slots, 0, tiles, gemv)
        if shared is not None:
            w1, b1, w2, b2 = (None if w is None else w.unsqueeze(0) for w in shared)
            _mlp_ffn(tokens, w1, b1, w2, b2, None, None, out_slots, top_k, tiles, gemv)
    return out_slots.sum(dim=1).to(x.dtype)


def _gelu_mlp(x, fc1_w, fc1_b, fc2_w, fc2_b) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, fc1_w, fc1_b), approximate="tanh"), fc2_w, fc2_b)


def mlp_experts_reference(
    x: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor | None,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor | None,
    expert_ids: torch.Tensor,
    combine: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """PyTorch twin of ``fused_mlp_experts``: a loop over experts on their own tokens (any device)."""
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)  # [S, D]
    for e in range(fc1_w.shape[0]):
        rows, k = (expert_ids == e).nonzero(as_tuple=True)
        if rows.numel():
            b1 = None if fc1_b is None else fc1_b[e]
            b2 = None if fc2_b is None else fc2_b[e]
            y = _gelu_mlp(x[rows], fc1_w[e], b1, fc2_w[e], b2).float()
            out.index_add_(0, rows, combine[rows, k].float()[:, None] * y)
    if shared is not None:
        out += _gelu_mlp(x, *shared).float()
    return out.to(x.dtype)
