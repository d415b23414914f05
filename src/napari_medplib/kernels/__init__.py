"""Triton kernels for the GPU fast path (MoE routing, token grouping, fused expert FFN).

Nothing is imported here on purpose: ``triton`` and ``torch`` load only when a kernel module is
imported, and ``TRITON_INTERPRET=1`` (CPU tests) must be set before that happens.
"""
