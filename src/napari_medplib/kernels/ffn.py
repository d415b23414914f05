"""Expert FFN kernels over the selected experts only (vLLM fused_moe structure, our code).

Weight layouts are the stacked ``nn.Linear`` weights of the PyTorch twin, so no transpose/copy:
``gate_w, up_w: [E, I, D]``, ``down_w: [E, D, I]`` (inner dim contiguous).

Two paths:
* grouped (prefill, many tokens): M-blocks of expert-sorted pairs (see ``align.py``); gate/up GEMMs
  with a SiLU-and-multiply epilogue -> h [pairs, I]; down GEMM with the routing weight in the
  epilogue, stored to out slot [token, k]. Blocks marked -1 (past the padded end) exit at once.
* gemv (decode, a few tokens): one program per (pair, N-tile) reads the x row and only the chosen
  expert's weight rows; no sort needed.

Per-(token, k) outputs go to their own slot (no atomics) and are summed afterwards, so the result is
deterministic. ``UPCAST`` (true only under the interpreter) turns bf16/fp16 operands into fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gate_up_grouped_kernel(
    x_ptr, wg_ptr, wu_ptr, h_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_ht,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    token = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    w_base = expert.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        a = tl.load(x_ptr + token[:, None] * stride_xt + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [M, K]
        w_off = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [K, N] view of W[e]^T
        w_mask = k_mask[:, None] & n_mask[None, :]
        bg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0)
        bu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_gate += tl.dot(a, bg, input_precision=PRECISION)
        acc_up += tl.dot(a, bu, input_precision=PRECISION)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, fp32
    h_off = pair[:, None].to(tl.int64) * stride_ht + offs_n[None, :]
    tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_grouped_kernel(
    h_ptr, wd_ptr, out_ptr, weight_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, inter, hidden,
    stride_ht, stride_we, stride_wn, stride_ot,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, SLOT_OFFSET: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(wd_ptr + w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pair, mask=row_mask, other=0.0)[:, None]
    out_row = (pair // TOP_K).to(tl.int64) * SLOTS + pair % TOP_K + SLOT_OFFSET
    tl.store(out_ptr + out_row[:, None] * stride_ot + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, wg_ptr, wu_ptr, h_ptr, ids_ptr,
    hidden, inter, stride_xt, stride_we, stride_wn, stride_ht,
    TOP_K: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        x = tl.load(x_ptr + token * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w_off = w_base + offs_n[:, None] * stride_wn + offs_k[None, :]  # [N, K] rows of W[e]
        w_mask = n_mask[:, None] & k_mask[None, :]
        acc_gate += tl.sum(tl.load(wg_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
        acc_up += tl.sum(tl.load(wu_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(h_ptr + pair.to(tl.int64) * stride_ht + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _down_gemv_kernel(
    h_ptr, wd_ptr, out_ptr, weight_ptr, ids_ptr,
    inter, hidden, stride_ht, stride_we, stride_wn, stride_ot,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, SLOT_OFFSET: tl.constexpr,
    HAS_IDS: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        w = tl.load(wd_ptr + w_base + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pair)
    out_row = (pair // TOP_K).to(tl.int64) * SLOTS + pair % TOP_K + SLOT_OFFSET
    tl.store(out_ptr + out_row * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
