"""Glue between ``model.moe.MoEFeedForward`` and ``fused_moe``.

The module keeps one ``ExpertMLP`` per expert (checkpoint names unchanged); the kernel wants
stacked [E, I, D] weights. ``packed_expert_weights`` stacks them once and re-points every expert
parameter at its slice of the stack, so afterwards there is a single copy in memory and no per-call
copy. If something replaces the parameters later (``.to()``, ``load_state_dict`` with assign), the
views no longer match and we pack again.

Med-MoE layers route in PyTorch and call ``routed_forward``: StableLM's SwiGLU experts go to
``moe.fused_experts``, Phi-2's fc1 -> GELU(tanh) -> fc2 experts (biases stacked too, by
``packed_mlp_weights``) to ``moe.fused_mlp_experts``; the meta expert is the always-on shared slot.
"""

from __future__ import annotations

import torch

from ._runtime import SUPPORTED_DTYPES

_PACKED_ATTR = "_fused_packed_weights"
_PACKED_MLP_ATTR = "_fused_packed_mlp_weights"
#: ``fused_moe`` path the module hook uses ("auto", "grouped", "gemv", "torch_grouped"); a GPU
#: session may switch prefill to "torch_grouped" if cuBLAS beats the Triton tiles there.
DEFAULT_PATH = "auto"


def _is_view_of(param: torch.Tensor, stacked: torch.Tensor, index: int) -> bool:
    return param.data_ptr() == stacked[index].data_ptr() and param.shape == stacked.shape[1:]


def _pack(module, params: tuple[tuple[str, str], ...], attr: str) -> tuple[torch.Tensor, ...]:
    """One stacked [E, ...] tensor per (submodule, parameter) name of ``module.experts``, sharing storage
    with the experts' parameters (packed once, again only if the parameters were replaced)."""
    packed = getattr(module, attr, None)
    if packed is not None and all(
        _is_view_of(getattr(getattr(ex, n), p), packed[i], e)
        for e, ex in enumerate(module.experts) for i, (n, p) in enumerate(params)
    ):
        return packed
    stacks = []
    # Not an inference tensor even when called under inference_mode: the parameters become views of
    # it, and a later training step must still be able to save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        for name, param in params:
            stacked = torch.stack([getattr(getattr(ex, name), param).detach() for ex in module.experts]).contiguous()
            for e, ex in enumerate(module.experts):
                getattr(getattr(ex, name), param).data = stacked[e]
            stacks.append(stacked)
    packed = tuple(stacks)
    object.__setattr__(module, attr, packed)
    return packed


def packed_expert_weights(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [E, I, D], up [E, I, D], down [E, D, I]) sharing storage with the module's parameters."""
    names = ("gate_proj", "up_proj", "down_proj")
    return _pack(module, tuple((n, "weight") for n in names), _PACKED_ATTR)  # type: ignore[return-value]


def packed_mlp_weights(module) -> tuple[torch.Tensor | None, ...]:
    """(fc1_w [E, I, D], fc1_b [E, I], fc2_w [E, D, I], fc2_b [E, D]) of fc1/fc2 experts, sharing storage
    with their parameters; a bias the experts lack is None."""
    params = tuple((n, p) for n in ("fc1", "fc2") for p in ("weight", "bias")
                   if getattr(getattr(module.experts[0], n), p) is not None)
    stacked = dict(zip(params, _pack(module, params, _PACKED_MLP_ATTR), strict=True))
    return tuple(stacked.get((n, p)) for n in ("fc1", "fc2") for p in ("weight", "bias"))


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
#: ``hidden_act`` names whose function is GELU's tanh approximation (what ``fused_mlp_experts`` computes)
GELU_TANH_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _is_swiglu(ex) -> bool:
    """A LLaMA/StableLM MLP: bias-free gate/up/down with SiLU (Phi-2's fc1/GELU/fc2 is not)."""
    cfg = getattr(ex, "config", None)
    act = getattr(cfg, "hidden_act", "silu") if cfg is not None else "silu"
    return all(
        isinstance(getattr(ex, n, None), torch.nn.Linear) and getattr(ex, n).bias is None
        for n in ("gate_proj", "up_proj", "down_proj")
    ) and act == "silu"


def _is_gelu_mlp(ex) -> bool:
    """A Phi-2 MLP: fc1 -> GELU(tanh) -> fc2 (biases or not), the activation named by its config."""
    act = getattr(getattr(ex, "config", None), "hidden_act", None)
    return (
        all(isinstance(getattr(ex, n, None), torch.nn.Linear) for n in ("fc1", "fc2"))
        and hasattr(ex, "activation_fn")
        and act in GELU_TANH_ACTS
    )


def _expert_kind(experts) -> str | None:
    """"swiglu" or "gelu_mlp" when every expert is of that kind (with the same bias layout), else None."""
    if all(_is_swiglu(ex) for ex in experts):
        return "swiglu"
    layout = {tuple(getattr(ex, n).bias is None for n in ("fc1", "fc2")) for ex in experts if _is_gelu_mlp(ex)}
    if len(layout) == 1 and all(_is_gelu_mlp(ex) for ex in experts):
        return "gelu_mlp"
    return None


def _expert_params(ex, kind: str) -> list[torch.Tensor]:
    names = ("gate_proj", "up_proj", "down_proj") if kind == "swiglu" else ("fc1", "fc2")
    return [p for n in names for p in (getattr(ex, n).weight, getattr(ex, n).bias) if p is not None]


def routed_supports(module, tokens: torch.Tensor) -> bool:
    """Whether ``routed_forward`` computes a ``MedMoESparseMoE``'s experts for this input: inference,
    experts (and meta expert) all SwiGLU (StableLM) or all fc1/GELU(tanh)/fc2 (Phi-2), in the tokens' dtype."""
    experts = list(module.experts) + ([module.meta_expert] if module.meta_expert is not None else [])
    if module.training or torch.is_grad_enabled() or tokens.dtype not in SUPPORTED_DTYPES:
        return False
    kind = _expert_kind(experts)
    return kind is not None and all(p.dtype == tokens.dtype for ex in experts for p in _expert_params(ex, kind))


def routed_forward(module, tokens: torch.Tensor, expert_ids: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
    """tokens [S, D] with the module's own routing -> routed experts + meta expert [S, D] (Triton)."""
    from .moe import fused_experts, fused_mlp_experts

    experts = list(module.experts) + ([module.meta_expert] if module.meta_expert is not None else [])
    ex = module.meta_expert
    if _expert_kind(experts) == "gelu_mlp":
        fc1_w, fc1_b, fc2_w, fc2_b = packed_mlp_weights(module)
        shared = None if ex is None else (ex.fc1.weight, ex.fc1.bias, ex.fc2.weight, ex.fc2.bias)
        return fused_mlp_experts(tokens, fc1_w, fc1_b, fc2_w, fc2_b, expert_ids, combine, shared=shared,
                                 path=DEFAULT_PATH)
    gate_w, up_w, down_w = packed_expert_weights(module)
    shared = None if ex is None else (ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight)
    return fused_experts(tokens, gate_w, up_w, down_w, expert_ids, combine, shared=shared, path=DEFAULT_PATH)
