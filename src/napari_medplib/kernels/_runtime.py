"""Where the kernels run: real GPU or the Triton CPU interpreter (decided once, at import).

Under ``TRITON_INTERPRET=1`` bf16/fp16 ``tl.dot`` and arithmetic are wrong in Triton 3.7 (numpy sees
bit patterns), so the kernels upcast operands to fp32 behind a constexpr flag that is true only
here; on a GPU the operands stay bf16 for the tensor cores (fp32 accumulation either way).
"""

from __future__ import annotations

import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


class KernelInputError(ValueError):
    """A tensor handed to a kernel has the wrong shape, dtype, device or layout."""


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs in IEEE fp32 (Triton's default would be TF32 on the GPU) so fp32 matches PyTorch."""
    return "ieee"


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    for t in tensors:
        if t.is_cuda:
            continue
        if not INTERPRET:
            raise KernelInputError(
                f"Triton kernels need CUDA tensors (got a {t.device} tensor); on CPU set "
                "TRITON_INTERPRET=1 before importing napari_medplib.kernels, or use model.moe's PyTorch path"
            )
