"""Router kernel: fp32 logits (x @ W^T + b) -> softmax -> top-k (-> renormalise), one launch.

PyTorch twin: ``model.moe.route_tokens`` on ``F.linear(x.float(), W.float(), b)``. Selection is an
iterative argmax over the logits (ties -> lowest expert id, like ``torch.argmax``), which equals
the twin's "argmax" policy (first = argmax, then the next-largest logits). Nothing is read back to
the host, so the call is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import KernelInputError, check_device, next_pow2


@triton.jit
def _router_topk_kernel(
    x_ptr, w_ptr, b_ptr,  # x [S, D] any float dtype, W [E, D], b [E]
    logits_ptr, ids_ptr, gate_ptr, combine_ptr,  # [S, E] f32, [S, K] i32, [S, K] f32, [S, K] f32
    num_tokens, hidden, stride_xt, stride_we,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    t_mask = offs_t < num_tokens
    e_mask = offs_e < NUM_EXPERTS
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for d0 in range(0, hidden, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < hidden
        x = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_d[None, :],
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [T, Dblk]
        w = tl.load(w_ptr + offs_e[:, None] * stride_we + offs_d[None, :],
                    mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [E, Dblk]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    io_mask = t_mask[:, None] & e_mask[None, :]
    tl.store(logits_ptr + offs_t[:, None] * NUM_EXPERTS + offs_e[None, :], acc, mask=io_mask)

    logits = tl.where(e_mask[None, :], acc, float("-inf"))
    row_max = tl.max(logits, axis=1)
    numer = tl.exp(logits - row_max[:, None])
    probs = numer / tl.sum(numer, axis=1)[:, None]  # [T, E_PAD], 0 on padded experts

    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if RENORMALIZE:  # first pass: the sum of the chosen probabilities
        scores = logits
        for _ in tl.static_range(TOP_K):
            idx = tl.argmax(scores, axis=1)
            chosen = offs_e[None, :] == idx[:, None]
            total += tl.sum(tl.where(chosen, probs, 0.0), axis=1)
            scores = tl.where(chosen, float("-inf"), scores)
        total = tl.maximum(total, 1.1920928955078125e-07)  # torch.finfo(float32).eps, as the twin
    scores = logits
    for k in tl.static_range(TOP_K):
        idx = tl.argmax(scores, axis=1)
        chosen = offs_e[None, :] == idx[:, None]
        prob_k = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        tl.store(ids_ptr + offs_t * TOP_K + k, idx.to(tl.int32), mask=t_mask)
        tl.store(gate_ptr + offs_t * TOP_K + k, prob_k, mask=t_mask)
        if RENORMALIZE:
            tl.store(combine_ptr + offs_t * TOP_K + k, prob_k / total, mask=t_mask)
        else:
            tl.store(combine_ptr + offs_t * TOP_K + k, prob_k, mask=t_mask)
        scores = tl.where(chosen, float("-inf"), scores)


def route(
    tokens: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None = None,
    top_k: int = 1,
    renormalize: bool = False,
    block_tokens: int = 16,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [S, D], router_w [E, D] (any float dtype; computed in fp32) ->
    (logits [S, E] f32, expert_ids [S, k] int32, gate_probs [S, k] f32, combine_weights [S, k] f32)."""
    if tokens.dim() != 2 or router_w.dim() != 2 or router_w.shape[1] != tokens.shape[1]:
        raise KernelInputError(
            f"route: tokens must be [S, D] and router_w [E, D]; got {tuple(tokens.shape)} and {tuple(router_w.shape)}"
        )
    num_tokens, hidden = tokens.shape
    num_experts = router_w.shape[0]
    if not 1 <= top_k <= num_experts:
        raise KernelInputError(f"route: need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if router_b is not None and router_b.shape != (num_experts,):
        raise KernelInputError(f"route: router_b must be [{num_experts}], got {tuple(router_b.shape)}")
    check_device(tokens, router_w)
    tokens = tokens if tokens.stride(1) == 1 else tokens.contiguous()
    router_w = router_w.contiguous()
    dev = tokens.device
    logits = torch.empty(num_tokens, num_experts, device=dev, dtype=torch.float32)
    expert_ids = torch.empty(num_tokens, top_k, device=dev, dtype=torch.int32)
    gate_probs = torch.empty(num_tokens, top_k, device=dev, dtype=torch.float32)
    combine = torch.empty(num_tokens, top_k, device=dev, dtype=torch.float32)
    if num_tokens == 0:
        return logits, expert_ids, gate_probs, combine
    block_d = block_d or min(next_pow2(hidden), 128)
    grid = (triton.cdiv(num_tokens, block_tokens),)
    _router_topk_kernel[grid](
        tokens, router_w, router_b if router_b is not None else router_w,
        logits, expert_ids, gate_probs, combine,
        num_tokens, hidden, tokens.stride(0), router_w.stride(0),
        NUM_EXPERTS=num_experts, E_PAD=max(next_pow2(num_experts), 2), TOP_K=top_k,
        HAS_BIAS=router_b is not None, RENORMALIZE=bool(renormalize),
        BLOCK_T=block_tokens, BLOCK_D=block_d,
    )
    return logits, expert_ids, gate_probs, combine
