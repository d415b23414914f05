"""Token grouping on device: (token, k) pairs sorted by expert, each expert's run padded to BLOCK_M.

Like vLLM's ``moe_align_block_size``: the FFN kernel then sees M-blocks that each belong to one
expert and gathers its rows through ``sorted_ids`` (pair index; ``token = pair // top_k``). Padding
entries hold the sentinel ``num_pairs``. Within an expert, pairs keep their original order (a stable
sort), so results are deterministic. One single-program launch, no host sync: all output sizes are
upper bounds known from the shapes alone.

PyTorch twin: ``align_block_size_reference`` below (``torch.sort(stable=True)`` + ``bincount``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._runtime import KernelInputError, check_device, next_pow2


@dataclass
class BlockAlignment:
    sorted_ids: torch.Tensor  # [max_padded] int32 pair index, sentinel = num_pairs on padding
    block_expert: torch.Tensor  # [max_blocks] int32 expert of each M-block, -1 past the end
    counts: torch.Tensor  # [E] int32 pairs per expert
    num_padded: torch.Tensor  # [1] int32 used length of sorted_ids (multiple of block_m)
    block_m: int
    num_pairs: int


def max_padded_length(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded length, from shapes only (no device read)."""
    bound = num_pairs + num_experts * (block_m - 1)
    bound = min(bound, num_pairs * block_m)  # few pairs: at most one block each
    return triton.cdiv(bound, block_m) * block_m


@triton.jit
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, counts_ptr, num_padded_ptr,
    num_pairs, max_blocks,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offs_e = tl.arange(0, E_PAD)
    e_valid = offs_e < NUM_EXPERTS
    # pass 1: histogram
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        expert = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
        counts += tl.sum((expert[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(counts_ptr + offs_e, counts, mask=e_valid)
    tl.store(num_padded_ptr, total)
    # the expert of each M-block: how many experts end at or before the block's first row
    for b0 in range(0, max_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        first_row = offs_b * BLOCK_M
        ended = (ends[None, :] <= first_row[:, None]) & e_valid[None, :]
        block_expert = tl.sum(ended.to(tl.int32), axis=1)
        block_expert = tl.where(first_row < total, block_expert, -1)
        tl.store(block_expert_ptr + offs_b, block_expert, mask=offs_b < max_blocks)
    # pass 2: stable scatter of pair indices to start[e] + rank within e
    seen = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < num_pairs
        expert = tl.load(ids_ptr + offs_p, mask=p_mask, other=-1)
        onehot = (expert[:, None] == offs_e[None, :]).to(tl.int32)  # [P, E_PAD]
        rank = tl.cumsum(onehot, axis=0) - onehot  # exclusive rank inside this chunk
        pos = tl.sum(onehot * (rank + (starts + seen)[None, :]), axis=1)
        tl.store(sorted_ptr + pos, offs_p, mask=p_mask)
        seen += tl.sum(onehot, axis=0)


def align_block_size(
    expert_ids: torch.Tensor, num_experts: int, block_m: int, chunk: int | None = None
) -> BlockAlignment:
    """expert_ids [S, k] (int32/int64, on device) -> BlockAlignment (all tensors on the same device).

    ``chunk``: pairs/blocks handled per loop step (power of two; default up to 1024; tests use small
    values to exercise the multi-step carry on toy shapes)."""
    if expert_ids.dim() != 2:
        raise KernelInputError(f"align_block_size: expert_ids must be [S, k], got {tuple(expert_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise KernelInputError(f"align_block_size: block_m must be a power of two, got {block_m}")
    check_device(expert_ids)
    flat = expert_ids.reshape(-1).to(torch.int32).contiguous()
    num_pairs = flat.numel()
    dev = flat.device
    max_padded = max_padded_length(num_pairs, num_experts, block_m)
    max_blocks = max_padded // block_m
    sorted_ids = torch.full((max(max_padded, 1),), num_pairs, device=dev, dtype=torch.int32)
    block_expert = torch.full((max(max_blocks, 1),), -1, device=dev, dtype=torch.int32)
    counts = torch.zeros(num_experts, device=dev, dtype=torch.int32)
    num_padded = torch.zeros(1, device=dev, dtype=torch.int32)
    if num_pairs:
        _align_kernel[(1,)](
            flat, sorted_ids, block_expert, counts, num_padded, num_pairs, max_blocks,
            NUM_EXPERTS=num_experts, E_PAD=max(next_pow2(num_experts), 2), BLOCK_M=block_m,
            BLOCK_P=chunk or min(max(next_pow2(num_pairs), 16), 1024),
            BLOCK_B=chunk or min(max(next_pow2(max_blocks), 16), 1024),
        )
    return BlockAlignment(sorted_ids, block_expert, counts, num_padded, block_m, num_pairs)


def align_block_size_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockAlignment:
    """PyTorch twin of ``align_block_size`` (same outputs, including padding and sizes)."""
    flat = expert_ids.reshape(-1).long()
    num_pairs = flat.numel()
    max_padded = max_padded_length(num_pairs, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    rank = torch.arange(num_pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_ids = torch.full((max(max_padded, 1),), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    block_expert = torch.full((max(max_padded // block_m, 1),), -1, dtype=torch.int32, device=flat.device)
    block_expert[: int(padded.sum()) // block_m] = torch.repeat_interleave(
        torch.arange(num_experts, device=flat.device), padded // block_m
    ).to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return BlockAlignment(sorted_ids, block_expert, counts.to(torch.int32), num_padded, block_m, num_pairs)
