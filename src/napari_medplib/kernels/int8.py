"""int8 weight-only matmuls: y = x @ (W_q * s[:, None])^T with W_q int8 [N, K] and one scale per output row.

The weights stay int8 in memory (half the bytes of bf16) and are widened tile by tile inside the
kernel; activations keep their dtype, accumulation is fp32, the scale (fp32) is applied once per
output in the epilogue. Two kernels:

* ``_int8_gemv_kernel`` (decode, a few rows): one program per (row, N-tile) reads its x row and a
  [BLOCK_N, K] strip of int8 weights. With ``expert_ids`` it is the MoE expert GEMV: row ``p`` reads
  x row ``p // X_DIV`` (``X_DIV`` = top_k for gate/up, 1 for down) and expert ``expert_ids[p]``'s
  weights from stacked [E, N, K] int8 / [E, N] scales. The expert is read on device: no host sync, so
  the call can be captured in a CUDA graph.
* ``_int8_mm_kernel`` (prefill, many rows): tiled GEMM; int8 tiles are converted to the activation
  dtype (exact: |q| <= 127 fits bf16's mantissa) for ``tl.dot``.

The PyTorch twins (dequantize, then ``F.linear``) are in ``model.quantize``, which does not import
Triton. ``UPCAST`` (true only under the interpreter) turns bf16/fp16 operands into fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, SUPPORTED_DTYPES, KernelInputError, check_device, dot_precision

#: rows up to which ``int8_linear`` uses the GEMV kernel (decode batches); the GEMM above
GEMV_MAX_ROWS = 4


@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, b_ptr, out_ptr,
    n_out, k_in,
    stride_xm, stride_we, stride_wn, stride_se, stride_om,
    X_DIV: tl.constexpr, HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    if HAS_IDS:
        expert = tl.load(ids_ptr + row).to(tl.int64)
    else:
        expert = 0
    x_row = (row // X_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    w_base = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_in
        x = tl.load(x_ptr + x_row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_base + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    scale = tl.load(s_ptr + expert * stride_se + offs_n, mask=n_mask, other=0.0)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int8_mm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    m_rows, n_out, k_in,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < m_rows
    n_mask = offs_n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_in
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [M, K]
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)  # [K, N] view of W^T, int8
        if UPCAST:
            a = a.to(tl.float32)
            b = w.to(tl.float32)
        else:
            b = w.to(a.dtype)
        acc += tl.dot(a, b, input_precision=PRECISION)
    acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check(x, weight, scale, name):
    check_device(x, weight, scale)
    if x.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name}: activations must be fp32/fp16/bf16, got {x.dtype}")
    if weight.dtype != torch.int8 or scale.dtype != torch.float32:
        raise KernelInputError(f"{name}: weight must be int8 and scale float32, got {weight.dtype} and {scale.dtype}")
    if weight.stride(-1) != 1 or scale.stride(-1) != 1:
        raise KernelInputError(f"{name}: weight and scale must be contiguous in their last dimension")
    if weight.shape[:-1] != scale.shape or x.shape[-1] != weight.shape[-1]:
        raise KernelInputError(f"{name}: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                               f"scale {tuple(scale.shape)} do not fit (weight [..., N, K], scale [..., N])")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ (weight int8 [N, K] * scale fp32 [N, 1])^T (+ bias) -> [..., N] in x's dtype."""
    _check(x, weight, scale, "int8_linear")
    if weight.dim() != 2:
        raise KernelInputError(f"int8_linear: weight must be [N, K], got {tuple(weight.shape)}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    (m_rows, k_in), n_out = rows.shape, weight.shape[0]
    out = torch.empty(m_rows, n_out, dtype=x.dtype, device=x.device)
    if m_rows == 0:
        return out.view(*lead, n_out)
    bias_arg = bias if bias is not None else scale  # unused pointer when HAS_BIAS is false
    if m_rows <= GEMV_MAX_ROWS:
        bn, bk = block_n or 64, block_k or 128
        _int8_gemv_kernel[(m_rows, triton.cdiv(n_out, bn))](
            rows, weight, scale, scale, bias_arg, out, n_out, k_in,
            rows.stride(0), 0, weight.stride(0), 0, out.stride(0),
            X_DIV=1, HAS_IDS=False, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk,
        )
    else:
        bm, bn, bk = 64 if m_rows > 32 else 16, block_n or 64, block_k or 64
        _int8_mm_kernel[(triton.cdiv(m_rows, bm), triton.cdiv(n_out, bn))](
            rows, weight, scale, bias_arg, out, m_rows, n_out, k_in,
            rows.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            UPCAST=INTERPRET or x.dtype == torch.float32, PRECISION=dot_precision(x.dtype),
        )
    return out.view(*lead, n_out)


def int8_expert_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expert_ids: torch.Tensor,
                     x_div: int = 1, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """Per (token, choice) row p: x[p // x_div] @ (weight[e_p] * scale[e_p])^T -> [P, N] in x's dtype.

    weight int8 [E, N, K], scale fp32 [E, N], expert_ids [P] (device, any int dtype). Reads only the
    chosen experts' weights, and no host sync: graph-capturable.
    """
    _check(x, weight, scale, "int8_expert_gemv")
    check_device(expert_ids)
    if weight.dim() != 3 or x.dim() != 2 or expert_ids.dim() != 1:
        raise KernelInputError(f"int8_expert_gemv: need x [S, K], weight [E, N, K], expert_ids [P]; got "
                               f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(expert_ids.shape)}")
    if expert_ids.shape[0] != x.shape[0] * x_div:
        raise KernelInputError(f"int8_expert_gemv: {expert_ids.shape[0]} rows for {x.shape[0]} x rows x {x_div}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, n_out, k_in = expert_ids.shape[0], weight.shape[1], weight.shape[2]
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    _int8_gemv_kernel[(rows, triton.cdiv(n_out, block_n))](
        x, weight, scale, expert_ids.contiguous(), scale, out, n_out, k_in,
        x.stride(0), weight.stride(0), weight.stride(1), scale.stride(0), out.stride(0),
        X_DIV=x_div, HAS_IDS=True, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
