"""Shared helpers for the kernel tests (a plain module: conftest files are not importable)."""

import torch


def moe_weights(num_experts, hidden, inter, dtype=torch.float32, device="cpu", seed=0, bias=False, shared=False):
    """Random MoE weights in fused_moe's layout, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(device=device, dtype=dtype)

    weights = {
        "router_w": (torch.randn(num_experts, hidden, generator=gen) * 4 / hidden**0.5).to(device),  # clear margins
        "gate_w": rnd(num_experts, inter, hidden, fan_in=hidden),
        "up_w": rnd(num_experts, inter, hidden, fan_in=hidden),
        "down_w": rnd(num_experts, hidden, inter, fan_in=inter),
        "router_b": torch.randn(num_experts, generator=gen).to(device) if bias else None,
        "shared": (rnd(inter, hidden, fan_in=hidden), rnd(inter, hidden, fan_in=hidden), rnd(hidden, inter, fan_in=inter))
        if shared
        else None,
    }
    return weights


def experts_list(w):
    return [(w["gate_w"][e], w["up_w"][e], w["down_w"][e]) for e in range(w["gate_w"].shape[0])]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
