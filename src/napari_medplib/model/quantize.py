"""int8 weight-only quantisation of the language model (so MedPLIB-7b-2e fits a 24 GB card).

``quantize_llm(model, "int8")`` replaces, in place, every ``nn.Linear`` of the decoder layers (attention
q/k/v/o, dense MLPs, the shared expert) by an ``Int8Linear`` and every MoE layer's experts by one
``Int8Experts`` (the experts are most of the bytes: 2 x 32 LLaMA-7B MLPs). Weights are stored as int8
with one symmetric scale per output channel: ``s = max|W[n, :]| / 127``, ``W_q = round(W / s)``.
Activations keep the model dtype; the weight is widened inside the matmul. Kept as they are: the
token embedding (a lookup), the router (fp32 routing decisions) and, by default, ``lm_head``
(``include_lm_head=True`` quantises it too).

Where the matmul runs: CUDA tensors with Triton installed go to ``kernels.int8`` (GEMV for decode
rows, GEMM for prefill); elsewhere the PyTorch twins below (dequantise to the activation dtype, then
``F.linear``), which the kernels are tested against. On CUDA the MoE layers of a quantised model take
a graph-capturable route: router + top-k in PyTorch, experts through ``int8_expert_gemv`` indexed on
device (no host sync), so ``kernels.graph_decode.StaticDecoder`` can capture the decode step. Prefill
(many tokens) runs the usual per-expert loop with the int8 GEMM.

Scales are kept in fp32 stored as int32 bits, so ``model.to(torch.bfloat16)`` leaves them exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe import MoEFeedForward, RoutingRecord, route_tokens

#: tokens up to which a quantised MoE layer uses the graph-capturable expert GEMV path on CUDA
EXPERT_GEMV_MAX_TOKENS = 16


# ---------------------------------------------------------------------------- functional core
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (int8 [..., N, K], fp32 scale [..., N]); symmetric, per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of ``kernels.int8.int8_linear``: dequantise to x's dtype, then ``F.linear``."""
    return F.linear(x, dequantize_weight(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def int8_expert_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, expert_ids: torch.Tensor,
                          x_div: int = 1) -> torch.Tensor:
    """The twin of ``kernels.int8.int8_expert_gemv``: row p = x[p // x_div] @ dequant(q[e_p])^T."""
    rows = x[torch.arange(expert_ids.shape[0], device=x.device) // x_div]  # [P, K]
    weights = dequantize_weight(q[expert_ids], scale[expert_ids], x.dtype)  # [P, N, K]
    return torch.bmm(weights, rows[:, :, None])[:, :, 0]


@functools.lru_cache(maxsize=1)
def _kernels():
    """``napari_medplib.kernels.int8`` when Triton is installed, else None (PyTorch twins only)."""
    try:
        import triton  # noqa: F401

        from ..kernels import int8
    except ImportError:
        return None
    return int8


def _use_kernel(x: torch.Tensor, use_kernel: bool | None) -> bool:
    if use_kernel is None:
        return x.is_cuda and _kernels() is not None
    return use_kernel


def _scale_buffer(scale: torch.Tensor) -> torch.Tensor:
    return scale.float().contiguous().view(torch.int32)  # int: dtype casts of the module leave it alone


# ---------------------------------------------------------------------------- modules
class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight [out, in] and an fp32 per-output scale; bias kept as is.

    ``use_kernel``: None = the Triton kernel on CUDA (when installed), the twin elsewhere; True/False
    forces it (True on CPU needs ``TRITON_INTERPRET=1``).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("weight_scale_bits", _scale_buffer(scale))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernel: bool | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernel(x, self.use_kernel):
            return _kernels().int8_linear(x, self.weight_int8, self.weight_scale, self.bias)
        return int8_linear_reference(x, self.weight_int8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class _Int8Expert:
    """Expert ``e`` of an ``Int8Experts`` as a callable (what the PyTorch MoE loop calls)."""

    def __init__(self, experts: Int8Experts, index: int) -> None:
        self.experts, self.index = experts, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ex, e = self.experts, self.index
        gate = ex.linear(x, ex.gate_int8[e], ex.scale("gate")[e])
        up = ex.linear(x, ex.up_int8[e], ex.scale("up")[e])
        return ex.linear(F.silu(gate) * up, ex.down_int8[e], ex.scale("down")[e])


class Int8Experts(nn.Module):
    """A MoE layer's SwiGLU experts, stacked: gate/up int8 [E, I, D], down int8 [E, D, I], fp32 scales.

    ``experts[e](x)`` runs expert e (the PyTorch loop of ``MoEFeedForward``); ``fused_forward`` is the
    hook ``MoEFeedForward`` calls on CUDA for the whole layer (the graph-capturable decode path).
    """

    def __init__(self, stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        for name in ("gate", "up", "down"):
            q, scale = stacks[name]
            self.register_buffer(f"{name}_int8", q.contiguous())
            self.register_buffer(f"{name}_scale_bits", _scale_buffer(scale))
        self.use_kernel: bool | None = None

    @classmethod
    def from_experts(cls, experts) -> Int8Experts:
        stacks = {}
        for name in ("gate", "up", "down"):
            weight = torch.stack([getattr(ex, f"{name}_proj").weight.detach() for ex in experts])
            stacks[name] = quantize_weight(weight)
        return cls(stacks)

    def scale(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_scale_bits").view(torch.float32)

    def linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if _use_kernel(x, self.use_kernel):
            return _kernels().int8_linear(x, q, scale)
        return int8_linear_reference(x, q, scale)

    def __len__(self) -> int:
        return self.gate_int8.shape[0]

    def __getitem__(self, index: int) -> _Int8Expert:
        if not -len(self) <= index < len(self):
            raise IndexError(f"expert {index} of {len(self)}")
        return _Int8Expert(self, index % len(self))

    def expert_rows(self, x: torch.Tensor, name: str, expert_ids: torch.Tensor, x_div: int) -> torch.Tensor:
        q, scale = getattr(self, f"{name}_int8"), self.scale(name)
        if _use_kernel(x, self.use_kernel):
            return _kernels().int8_expert_gemv(x, q, scale, expert_ids, x_div)
        return int8_expert_reference(x, q, scale, expert_ids, x_div)

    def fused_forward(self, moe: MoEFeedForward, tokens: torch.Tensor) -> tuple[torch.Tensor, RoutingRecord] | None:
        """tokens [S, D] -> (out [S, D], RoutingRecord) without a host sync, or None (use the loop).

        Routing as ``MoEFeedForward`` (fp32 router, softmax, top-k, renormalise); then per (token,
        choice) row the chosen expert's gate/up GEMV, SiLU * up, down GEMV, times the combine weight,
        summed over the choices; plus the shared expert. Only for inference at decode sizes.
        """
        cfg = moe.config
        if (moe.training or torch.is_grad_enabled() or cfg.eval_drop_tokens
                or (cfg.top_k > 1 and cfg.second_expert_policy != "argmax")
                or tokens.shape[0] > EXPERT_GEMV_MAX_TOKENS or not _use_kernel(tokens, self.use_kernel)):
            return None
        logits = moe.router_logits(tokens)
        expert_ids, gate_probs, combine = route_tokens(logits, cfg.top_k, cfg.renormalize)
        flat_ids = expert_ids.flatten()  # [S * k], row p belongs to token p // k
        gate = self.expert_rows(tokens, "gate", flat_ids, cfg.top_k)
        up = self.expert_rows(tokens, "up", flat_ids, cfg.top_k)
        rows = self.expert_rows(F.silu(gate) * up, "down", flat_ids, 1)  # [S * k, D]
        rows = rows * combine.flatten().to(rows.dtype)[:, None]
        output = rows.view(tokens.shape[0], cfg.top_k, -1).sum(dim=1)
        if moe.shared_expert is not None:
            output = output + moe.shared_expert(tokens)
        return output, RoutingRecord(logits, expert_ids, gate_probs, combine)


# ---------------------------------------------------------------------------- whole model
def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers (a tied parameter counted once). Works on the meta device."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class QuantizeReport:
    mode: str
    bytes_before: int
    bytes_after: int
    linears: int  # nn.Linear modules replaced
    expert_layers: int  # MoE layers whose experts were stacked and quantised

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        return (f"{self.mode}: {self.linears} linear layers + {self.expert_layers} MoE expert sets quantised; "
                f"LLM {self.bytes_before / 2**30:.2f} GiB -> {self.bytes_after / 2**30:.2f} GiB ({self.ratio:.2f}x smaller)")


def _language_model(model: nn.Module) -> nn.Module:
    return getattr(model, "language_model", model)  # MedPLIBModel or the bare MedPLIBLanguageModel


@torch.no_grad()
def quantize_llm(model: nn.Module, mode: str = "int8", include_lm_head: bool = False) -> QuantizeReport:
    """Quantise the language model of ``model`` (a ``MedPLIBModel`` or ``MedPLIBLanguageModel``) in place.

    Only ``mode="int8"`` (weight-only, per-output-channel symmetric) exists. Returns the LLM's bytes
    before and after. Inference only: the int8 weights take no gradient.
    """
    if mode != "int8":
        raise ValueError(f"quantize_llm: unknown mode {mode!r} (supported: 'int8')")
    llm = _language_model(model)
    before = module_bytes(llm)
    linears = expert_layers = 0
    for layer in llm.layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoEFeedForward) and not isinstance(mlp.experts, Int8Experts):
            if not all(isinstance(getattr(ex, n, None), nn.Linear) and getattr(ex, n).bias is None
                       for ex in mlp.experts for n in ("gate_proj", "up_proj", "down_proj")):
                raise ValueError("quantize_llm: MoE experts must be bias-free gate/up/down nn.Linear (SwiGLU)")
            for name in ("_fused_packed_weights",):  # stacked bf16 copies from the Triton path are stale now
                if hasattr(mlp, name):
                    object.__delattr__(mlp, name)
            mlp.experts = Int8Experts.from_experts(mlp.experts)
            expert_layers += 1
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not getattr(mlp, "router", None):
                    setattr(parent, name, Int8Linear.from_linear(child))
                    linears += 1
    if include_lm_head and type(llm.lm_head) is nn.Linear:
        if llm.lm_head.weight is llm.embed_tokens.weight:
            raise ValueError("quantize_llm: lm_head is tied to the embedding; keep it (include_lm_head=False)")
        llm.lm_head = Int8Linear.from_linear(llm.lm_head)
        linears += 1
    return QuantizeReport(mode, before, module_bytes(llm), linears, expert_layers)
