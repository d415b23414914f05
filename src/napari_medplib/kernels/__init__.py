"""Triton kernels for the GPU fast path of the MoE decoder.

Public entry points (import the submodule; nothing is imported here):

* ``kernels.moe.fused_moe(x, router_w, gate_w, up_w, down_w, top_k=1, renormalize=None,
  router_b=None, shared=None, tiles=None, path="auto") -> (out, RoutingRecord)``
* ``kernels.moe.fused_experts(x, gate_w, up_w, down_w, expert_ids, combine, shared=None)`` -- the
  expert stage alone, for callers that route themselves (Med-MoE, via ``dispatch.routed_forward``)
* ``kernels.moe.fused_mlp_experts(x, fc1_w, fc1_b, fc2_w, fc2_b, expert_ids, combine, shared=None)`` --
  the same for non-gated GELU(tanh) experts with biases (Med-MoE on Phi-2)
* ``kernels.decode_attention`` -- split-K decode attention over the written span of a static KV cache
  (length on the device, CUDA-graph capturable; PyTorch twin in ``graph_decode``)
* ``kernels.int8`` -- int8 weight-only GEMV / GEMM / expert GEMV (``model.quantize.quantize_llm``)
* ``kernels.routing.route(tokens, router_w, router_b=None, top_k=1, renormalize=False)``
* ``kernels.align.align_block_size(expert_ids, num_experts, block_m)`` (+ ``_reference`` twin)
* ``kernels.dispatch`` -- what ``model.moe.MoEFeedForward`` calls on CUDA
* ``kernels.graph_decode.StaticDecoder`` -- static KV cache + CUDA-graph decode step
* ``kernels.torch_grouped.grouped_mm_experts`` -- ``torch._grouped_mm`` expert path

Nothing is imported here on purpose: ``triton`` and ``torch`` load only when a kernel module is
imported, and ``TRITON_INTERPRET=1`` (CPU tests) must be set before that happens.
"""
