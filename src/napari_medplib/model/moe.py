"""The mixture-of-experts feed-forward block (MedPLIB task experts, Med-MoE meta expert).

Semantics (DeepSpeed ``TopKGate`` as MedPLIB and Med-MoE use it, run locally without all-to-all):

* router logits = ``x_fp32 @ W_fp32^T (+ b)``; probs = softmax over experts (fp32);
* top-1: expert = argmax; the output is ``p[expert] * Expert(x)`` with the raw, *not* renormalised
  probability (MedPLIB, Med-MoE top-1);
* top-k > 1: the first expert is the argmax; the others the next-largest logits ("argmax" policy) or,
  like DeepSpeed top-2, the argmax of logits + Gumbel noise ("gumbel", stochastic even at eval). The
  chosen probabilities are renormalised to sum to 1 (DeepSpeed top-2 / top-k);
* optional always-on shared ("meta") expert added unweighted (Med-MoE: y = sum_k g_k E_k(x) + E_meta(x));
* capacity: in training, ``ceil(k * S / E * capacity_factor)`` (at least ``min_capacity``) tokens per
  expert; overflowing assignments are dropped (random token selection, first choices before second
  choices) and contribute nothing. In eval mode nothing is dropped (for MedPLIB's E=2, cf=2 this is
  also what DeepSpeed does, since capacity = S). ``MoEConfig.eval_drop_tokens`` restores DeepSpeed's
  eval-time dropping with ``eval_capacity_factor`` (it matters when E > k * eval_capacity_factor).

Only the chosen experts run, each on the tokens routed to it (gather -> expert -> scale -> index_add).
``moe_forward_reference`` is the functional twin a Triton kernel can be tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.records import RoutingRecord
from .config import MoEConfig


# ---------------------------------------------------------------------------- functional core
def route_tokens(
    router_logits: torch.Tensor,
    top_k: int = 1,
    renormalize: bool = False,
    second_expert_policy: str = "argmax",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits [S, E] fp32 -> (expert_ids [S, k], gate_probs [S, k], combine_weights [S, k])."""
    probs = torch.softmax(router_logits, dim=-1)  # [S, E]
    if top_k == 1:
        gate_probs, expert_ids = probs.max(dim=-1, keepdim=True)
    else:
        first = router_logits.argmax(dim=-1, keepdim=True)  # [S, 1]
        scores = router_logits
        if second_expert_policy == "gumbel":
            uniform = torch.rand(scores.shape, generator=generator, device="cpu").to(scores.device)
            scores = scores - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        scores = scores.scatter(-1, first, float("-inf"))
        rest = scores.topk(top_k - 1, dim=-1).indices  # [S, k-1]
        expert_ids = torch.cat([first, rest], dim=-1)
        gate_probs = probs.gather(-1, expert_ids)
    combine = gate_probs
    if renormalize:
        combine = gate_probs / gate_probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gate_probs.dtype).eps)
    return expert_ids, gate_probs, combine


def capacity_drops(
    expert_ids: torch.Tensor, num_experts: int, capacity: int, use_rts: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[S, k] bool: assignments over an expert's capacity. First choices keep priority over second
    choices; within a rank, a random subset is kept (RTS) or the earliest tokens."""
    num_tokens, top_k = expert_ids.shape
    if use_rts:
        order = torch.rand(num_tokens, generator=generator, device="cpu").to(expert_ids.device)
    else:
        order = torch.arange(num_tokens, device=expert_ids.device, dtype=torch.float32) / max(num_tokens, 1)
    priority = (torch.arange(top_k, device=expert_ids.device)[None, :] + order[:, None]).flatten()  # [S*k]
    flat_ids = expert_ids.flatten()
    dropped = torch.zeros_like(flat_ids, dtype=torch.bool)
    for e in range(num_experts):
        slots = (flat_ids == e).nonzero().squeeze(1)
        if slots.numel() > capacity:
            keep_order = priority[slots].argsort()
            dropped[slots[keep_order[capacity:]]] = True
    return dropped.view(num_tokens, top_k)


def dispatch_combine(
    hidden_states: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    num_experts: int,
) -> torch.Tensor:
    """Run each expert only on its tokens: [S, D] -> [S, D] = sum_k w_k * Expert_{id_k}(x)."""
    output = torch.zeros_like(hidden_states)
    flat_ids = expert_ids.flatten()  # [S*k]
    flat_w = combine_weights.flatten()
    token_idx = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(expert_ids.shape[1])
    for e in range(num_experts):
        slots = ((flat_ids == e) & (flat_w != 0)).nonzero().squeeze(1)
        if slots.numel() == 0:
            continue
        tokens = token_idx[slots]
        expert_out = expert_fn(e, hidden_states[tokens])  # [n_e, D]
        expert_out = expert_out * flat_w[slots].to(expert_out.dtype)[:, None]
        output.index_add_(0, tokens, expert_out)
    return output


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def moe_forward_reference(
    hidden_states: torch.Tensor,
    router_weight: torch.Tensor,
    experts_weights: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    router_bias: torch.Tensor | None = None,
    top_k: int = 1,
    renormalize: bool | None = None,
    shared_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, RoutingRecord]:
    """Inference MoE on [S, D] tokens with plain tensors (deterministic argmax routing, no drops).

    ``experts_weights[e] = (gate_proj [I, D], up_proj [I, D], down_proj [D, I])``.
    """
    router_logits = F.linear(
        hidden_states.float(), router_weight.float(), None if router_bias is None else router_bias.float()
    )
    renorm = top_k > 1 if renormalize is None else renormalize
    expert_ids, gate_probs, combine = route_tokens(router_logits, top_k, renorm)
    output = dispatch_combine(
        hidden_states, expert_ids, combine, lambda e, x: swiglu(x, *experts_weights[e]), len(experts_weights)
    )
    if shared_weights is not None:
        output = output + swiglu(hidden_states, *shared_weights)
    return output, RoutingRecord(router_logits, expert_ids, gate_probs, combine)


@functools.lru_cache(maxsize=1)
def _triton_dispatch():
    """``napari_medplib.kernels.dispatch`` when Triton is installed, else None (PyTorch path only)."""
    try:
        import triton  # noqa: F401

        from ..kernels import dispatch
    except ImportError:
        return None
    return dispatch


# ---------------------------------------------------------------------------- modules
class ExpertMLP(nn.Module):
    """One expert: a LLaMA MLP (same parameter names as ``LlamaMLP``)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MoEFeedForward(nn.Module):
    """Drop-in replacement for a decoder layer's ``mlp``: [B, L, D] -> [B, L, D].

    The routing of the last call is kept in ``last_routing`` (a ``RoutingRecord``) while
    ``record_routing`` is true, so callers can show which expert answered.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.router = nn.Linear(hidden_size, config.num_experts, bias=config.router_bias)
        self.experts = nn.ModuleList(ExpertMLP(hidden_size, intermediate_size) for _ in range(config.num_experts))
        self.shared_expert = ExpertMLP(hidden_size, intermediate_size) if config.shared_expert else None
        self.record_routing = True
        self.last_routing: RoutingRecord | None = None
        self.generator: torch.Generator | None = None  # for RTS / Gumbel; None = global RNG
        self.use_kernels = True  # CUDA inference: Triton fused_moe when the config allows it

    def _fused_forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, RoutingRecord] | None:
        """The Triton path when installed and supported, else None. A kernel that fails (a GPU or
        Triton version it does not compile for) turns the kernels off for this layer with a warning,
        and the PyTorch path answers instead: same numbers, only slower. Experts that bring their own
        layer path (``fused_forward``, e.g. ``model.quantize.Int8Experts``) are asked instead; None
        from them means the PyTorch path."""
        own = getattr(self.experts, "fused_forward", None)
        kernels = _triton_dispatch() if own is None else None
        if own is None and (kernels is None or not kernels.supports(self, tokens)):
            return None
        try:
            return own(self, tokens) if own is not None else kernels.fused_forward(self, tokens)
        except Exception as exc:  # compile/launch errors come as many types
            import warnings

            self.use_kernels = False
            warnings.warn(
                f"Triton MoE kernels failed ({type(exc).__name__}: {exc}); using the PyTorch path",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[S, D] -> [S, E] in ``router_dtype`` (fp32: the reference casts ``wg`` and x to fp32)."""
        dtype = getattr(torch, self.config.router_dtype)
        bias = self.router.bias.to(dtype) if self.router.bias is not None else None
        return F.linear(tokens.to(dtype), self.router.weight.to(dtype), bias)

    def capacity(self, num_tokens: int) -> int:
        cfg = self.config
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return max(math.ceil(cfg.top_k * num_tokens / cfg.num_experts * factor), cfg.min_capacity)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        batch_shape = hidden_states.shape[:-1]
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # [S, D]
        fused = self._fused_forward(tokens) if self.use_kernels and tokens.is_cuda else None
        if fused is not None:
            output, record = fused
            if self.record_routing:
                self.last_routing = record
            return output.view(*batch_shape, -1)
        logits = self.router_logits(tokens)  # [S, E] fp32
        policy = cfg.second_expert_policy
        expert_ids, gate_probs, combine = route_tokens(logits, cfg.top_k, cfg.renormalize, policy, self.generator)
        dropped = aux_loss = None
        if self.training or cfg.eval_drop_tokens:
            dropped = capacity_drops(expert_ids, self.num_experts, self.capacity(tokens.shape[0]), cfg.use_rts, self.generator)
            combine = combine.masked_fill(dropped, 0.0)
            if self.training and cfg.router_aux_loss_coef > 0:
                probs = torch.softmax(logits, dim=-1)
                top1 = F.one_hot(expert_ids[:, 0], self.num_experts).float()
                aux_loss = self.num_experts * (probs.mean(0) * top1.mean(0)).sum()
        output = dispatch_combine(tokens, expert_ids, combine, lambda e, x: self.experts[e](x), self.num_experts)
        if self.shared_expert is not None:
            output = output + self.shared_expert(tokens)
        if self.record_routing:
            self.last_routing = RoutingRecord(logits.detach(), expert_ids, gate_probs.detach(), combine.detach(), dropped, aux_loss)
        return output.view(*batch_shape, -1)
