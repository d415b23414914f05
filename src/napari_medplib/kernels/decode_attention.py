"""Decode attention over the written span of a static KV cache (split-K / flash-decoding, Triton).

One new query per sequence (q [B, Hq, 1, d]) against the static cache buffers k, v [B, Hkv, max_len, d]
of which only the first ``lengths[b]`` positions are written. ``lengths`` is a device tensor (shape []
or [B]), so nothing here syncs with the host and the call can be captured in a CUDA graph: the grid
is fixed by ``max_len``, and the programs whose key range starts at or past the length exit at once,
so the bytes read follow the written length, not ``max_len``.

Two stages:

* ``_split_kernel``: grid (B * Hkv, splits). A program takes one KV head and all ``Hq // Hkv`` query
  heads that share it (GQA: K/V are read once per group), walks its key range in ``BLOCK_N`` blocks
  up to the length with an online softmax, and writes the unnormalised partial output plus its
  running max and sum (fp32).
* ``_combine_kernel``: grid (B * Hq,). Rescales the splits' partials to a common max and normalises.

``decode_attention_reference`` (defined in ``graph_decode``, which must not import Triton) is the
PyTorch twin: SDPA over the sliced span, one sequence at a time, reading the lengths on the host. Math is fp32 whatever the storage dtype: K/V tiles are
converted right after the load (no ``tl.dot``), which is exact under the interpreter too and costs
nothing in a bandwidth-bound decode.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._runtime import SUPPORTED_DTYPES, KernelInputError, check_device, next_pow2

#: keys per block of the inner loop; 64 keeps a [16, 64] score tile and [64, d] K/V tiles in registers
DEFAULT_BLOCK_N = 64
#: aim for about this many (head, split) programs so a batch-1 decode still fills an H100's 132 SMs
TARGET_PROGRAMS = 264


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, stats_ptr,
    kv_heads, split_len, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ab, stride_ah, stride_as, stride_sb, stride_sh, stride_ss, len_stride,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads
    length = tl.load(len_ptr + b * len_stride)
    start = split * split_len
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # the query heads that read this KV head
    stat_off = b.to(tl.int64) * stride_sb + heads * stride_sh + split * stride_ss
    if start >= length:  # nothing written in this range: weight 0 in the combine
        tl.store(stats_ptr + stat_off, tl.full((GROUP_PAD,), float("-inf"), tl.float32), mask=g_mask)
        tl.store(stats_ptr + stat_off + 1, tl.zeros((GROUP_PAD,), tl.float32), mask=g_mask)
        return
    end = tl.minimum(start + split_len, length)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [G, D]
    q = q * scale
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if GROUP == 1:  # MHA: row 0 of the padded group is the only live one; 2-D tiles only
            s1 = tl.sum(tl.sum(q, axis=0)[None, :] * k, axis=1)  # [N] (padded rows of q are 0)
            scores = tl.where((offs_g == 0)[:, None], s1[None, :], 0.0)  # [G, N]
        else:
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, N]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if GROUP == 1:
            pv = tl.sum(tl.sum(tl.where((offs_g == 0)[:, None], p, 0.0), axis=0)[:, None] * v, axis=0)  # [D]
            acc = acc * alpha[:, None] + tl.where((offs_g == 0)[:, None], pv[None, :], 0.0)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    acc_off = b.to(tl.int64) * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :]
    tl.store(acc_ptr + acc_off, acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(stats_ptr + stat_off, m_i, mask=g_mask)
    tl.store(stats_ptr + stat_off + 1, l_i, mask=g_mask)


@triton.jit
def _combine_kernel(
    acc_ptr, stats_ptr, out_ptr, q_heads, splits,
    stride_ab, stride_ah, stride_as, stride_sb, stride_sh, stride_ss, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // q_heads
    h = pid % q_heads
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    s_mask = offs_s < splits
    d_mask = offs_d < HEAD_DIM
    stat_off = b.to(tl.int64) * stride_sb + h * stride_sh + offs_s * stride_ss
    m = tl.load(stats_ptr + stat_off, mask=s_mask, other=float("-inf"))
    l_s = tl.load(stats_ptr + stat_off + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits weigh nothing
    acc = tl.load(acc_ptr + b.to(tl.int64) * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :] & (m > float("-inf"))[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(q, k, v, lengths):
    if q.dim() != 4 or q.shape[2] != 1:
        raise KernelInputError(f"decode_attention: q must be [B, Hq, 1, d], got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise KernelInputError(f"decode_attention: k, v must be [B, Hkv, max_len, d] matching q {tuple(q.shape)}, "
                               f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise KernelInputError(f"decode_attention: {q.shape[1]} query heads do not group over {k.shape[1]} KV heads")
    if lengths.dim() > 1 or (lengths.dim() == 1 and lengths.shape[0] != q.shape[0]):
        raise KernelInputError(f"decode_attention: lengths must be a scalar or [B] tensor, got {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"decode_attention: lengths must be int32/int64, got {lengths.dtype}")
    for t in (q, k, v):
        if t.dtype not in SUPPORTED_DTYPES:
            raise KernelInputError(f"decode_attention: unsupported dtype {t.dtype}")
        if t.stride(-1) != 1:
            raise KernelInputError("decode_attention: the head dimension must be contiguous")


def num_splits(batch: int, kv_heads: int, max_len: int, block_n: int = DEFAULT_BLOCK_N) -> int:
    """Splits of the key axis: enough programs to fill the GPU, never more than one per block."""
    blocks = max(1, math.ceil(max_len / block_n))
    return max(1, min(blocks, math.ceil(TARGET_PROGRAMS / max(batch * kv_heads, 1))))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, block_n: int = DEFAULT_BLOCK_N, splits: int | None = None) -> torch.Tensor:
    """softmax(q k[:len]^T * scale) v[:len] per sequence -> [B, Hq, 1, d] in q's dtype.

    ``lengths`` (int, device) = positions written per sequence; every length must be >= 1 and
    <= max_len (not checked: that would need a host sync). No host sync, fixed grid: graph-capturable.
    """
    _check(q, k, v, lengths)
    check_device(q, k, v, lengths)
    batch, q_heads, _, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    splits = num_splits(batch, kv_heads, max_len, block_n) if splits is None else int(splits)
    split_len = math.ceil(math.ceil(max_len / splits) / block_n) * block_n
    lengths = lengths.to(torch.int32) if lengths.dtype != torch.int32 else lengths
    acc = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch, q_heads, splits, 2, dtype=torch.float32, device=q.device)  # (max, sum)
    out = torch.empty(batch, q_heads, 1, head_dim, dtype=q.dtype, device=q.device)
    dim_pad = max(16, next_pow2(head_dim))
    _split_kernel[(batch * kv_heads, splits)](
        q, k, v, lengths, acc, stats, kv_heads, split_len, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        acc.stride(0), acc.stride(1), acc.stride(2), stats.stride(0), stats.stride(1), stats.stride(2),
        1 if lengths.dim() == 1 else 0,
        GROUP=group, GROUP_PAD=max(2, next_pow2(group)), HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_N=block_n,
    )
    _combine_kernel[(batch * q_heads,)](
        acc, stats, out, q_heads, splits,
        acc.stride(0), acc.stride(1), acc.stride(2), stats.stride(0), stats.stride(1), stats.stride(2),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, SPLIT_PAD=max(2, next_pow2(splits)),
    )
    return out
