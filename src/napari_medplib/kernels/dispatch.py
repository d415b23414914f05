"""Glue between ``model.moe.MoEFeedForward`` and ``fused_moe``.

The module keeps one ``ExpertMLP`` per expert (checkpoint names unchanged); the kernel wants
stacked [E, I, D] weights. ``packed_expert_weights`` stacks them once and re-points every expert
parameter at its slice of the stack, so afterwards there is a single copy in memory and no per-call
copy. If something replaces the parameters later (``.to()``, ``load_state_dict`` with assign), the
views no longer match and we pack again.
"""

from __future__ import annotations

import torch

from ._runtime import SUPPORTED_DTYPES

_PACKED_ATTR = "_fused_packed_weights"
#: ``fused_moe`` path the module hook uses ("auto", "grouped", "gemv", "torch_grouped"); a GPU
#: session may switch prefill to "torch_grouped" if cuBLAS beats the Triton tiles there.
DEFAULT_PATH = "auto"


def _is_view_of(param: torch.Tensor, stacked: torch.Tensor, index: int) -> bool:
    return param.data_ptr() == stacked[index].data_ptr() and param.shape == stacked.shape[1:]


def packed_expert_weights(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [E, I, D], up [E, I, D], down [E, D, I]) sharing storage with the module's parameters."""
    names = ("gate_proj", "up_proj", "down_proj")
    packed = getattr(module, _PACKED_ATTR, None)
    if packed is not None and all(
        _is_view_of(getattr(ex, n).weight, packed[i], e) for e, ex in enumerate(module.experts) for i, n in enumerate(names)
    ):
        return packed
    stacks = []
    # Not an inference tensor even when called under inference_mode: the parameters become views of
    # it, and a later training step must still be able to save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        for name in names:
            stacked = torch.stack([getattr(ex, name).weight.detach() for ex in module.experts]).contiguous()
            for e, ex in enumerate(module.experts):
                getattr(ex, name).weight.data = stacked[e]
            stacks.append(stacked)
    packed = tuple(stacks)
    object.__setattr__(module, _PACKED_ATTR, packed)
    return packed


def supports(module, hidden_states: torch.Tensor) -> bool:
    """Whether ``fused_forward`` reproduces the module's semantics for this input."""
    cfg = module.config
    return (
        not module.training
        and not cfg.eval_drop_tokens
        and cfg.router_dtype == "float32"
        and (cfg.top_k == 1 or cfg.second_expert_policy == "argmax")
        and hidden_states.dtype in SUPPORTED_DTYPES
        and module.experts[0].gate_proj.weight.dtype == hidden_states.dtype
        and not torch.is_grad_enabled()
    )


def fused_forward(module, tokens: torch.Tensor):
    """tokens [S, D] -> (out [S, D], RoutingRecord) through the Triton kernels."""
    from .moe import fused_moe

    gate_w, up_w, down_w = packed_expert_weights(module)
    shared = None
    if module.shared_expert is not None:
        ex = module.shared_expert
        shared = (ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight)
    return fused_moe(
        tokens, module.router.weight, gate_w, up_w, down_w, top_k=module.config.top_k,
        renormalize=module.config.renormalize, router_b=module.router.bias, shared=shared, path=DEFAULT_PATH,
    )


# ---------------------------------------------------------------------------- Med-MoE layers
def _is_swiglu(ex) -> bool:
    """A LLaMA/StableLM MLP: bias-free gate/up/down with SiLU (Phi-2's fc1/GELU/fc2 is not)."""
    cfg = getattr(ex, "config", None)
    act = getattr(cfg, "hidden_act", "silu") if cfg is not None else "silu"
    return all(
        isinstance(getattr(ex, n, None), torch.nn.Linear) and getattr(ex, n).bias is None
        for n in ("gate_proj", "up_proj", "down_proj")
    ) and act == "silu"


def routed_supports(module, tokens: torch.Tensor) -> bool:
    """Whether ``routed_forward`` computes a ``MedMoESparseMoE``'s experts for this input: inference,
    SwiGLU experts (and meta expert) in the tokens' dtype."""
    experts = list(module.experts) + ([module.meta_expert] if module.meta_expert is not None else [])
    return (
        not module.training
        and not torch.is_grad_enabled()
        and tokens.dtype in SUPPORTED_DTYPES
        and all(_is_swiglu(ex) for ex in experts)
        and all(getattr(ex, n).weight.dtype == tokens.dtype for ex in experts for n in ("gate_proj", "up_proj", "down_proj"))
    )


def routed_forward(module, tokens: torch.Tensor, expert_ids: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
    """tokens [S, D] with the module's own routing -> routed experts + meta expert [S, D] (Triton)."""
    from .moe import fused_experts

    gate_w, up_w, down_w = packed_expert_weights(module)
    shared = None
    if module.meta_expert is not None:
        ex = module.meta_expert
        shared = (ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight)
    return fused_experts(tokens, gate_w, up_w, down_w, expert_ids, combine, shared=shared, path=DEFAULT_PATH)
