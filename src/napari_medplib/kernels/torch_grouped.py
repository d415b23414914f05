"""Expert FFN with PyTorch's grouped GEMM (``torch._grouped_mm``, cuBLAS/CUTLASS on Hopper).

An alternative prefill path for ``fused_moe(path="torch_grouped")``: with 2 experts and ~1k tokens
each expert GEMM is a big, cuBLAS-friendly shape, and vendor GEMMs may beat an untuned Triton tile.
Unlike the twin's expert loop it never syncs with the host: the permutation is a device sort and the
group offsets are a device cumsum (``torch.bincount`` would sync to size its output).
Runs on CPU too (fp32/bf16), which is how it is tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_experts(
    tokens: torch.Tensor,  # [S, D]
    gate_w: torch.Tensor,  # [E, I, D]
    up_w: torch.Tensor,  # [E, I, D]
    down_w: torch.Tensor,  # [E, D, I]
    expert_ids: torch.Tensor,  # [S, k] int
    combine: torch.Tensor,  # [S, k] f32
) -> torch.Tensor:
    """sum_k combine[s, k] * FFN_{expert_ids[s, k]}(x_s) -> [S, D] (fp32 if k > 1, else x's dtype)."""
    num_tokens, hidden = tokens.shape
    num_experts, top_k = gate_w.shape[0], expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert
    token_of = order // top_k
    counts = torch.zeros(num_experts, dtype=torch.int32, device=tokens.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # group ends, as _grouped_mm expects
    grouped_x = tokens.index_select(0, token_of)  # [S*k, D]
    gate = torch._grouped_mm(grouped_x, gate_w.transpose(1, 2), offs=offsets)  # [S*k, I]
    up = torch._grouped_mm(grouped_x, up_w.transpose(1, 2), offs=offsets)
    expert_out = torch._grouped_mm(F.silu(gate) * up, down_w.transpose(1, 2), offs=offsets)  # [S*k, D]
    expert_out = expert_out * combine.reshape(-1)[order].to(expert_out.dtype)[:, None]
    out_dtype = tokens.dtype if top_k == 1 else torch.float32
    out = torch.zeros(num_tokens, hidden, dtype=out_dtype, device=tokens.device)
    return out.index_add_(0, token_of, expert_out.to(out_dtype))
