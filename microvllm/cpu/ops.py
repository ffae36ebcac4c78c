"""The forward's RMSNorm, rotary embedding and relu^2 on the CPU, each one C call (fused_ops.c).

Same contract as `gpt.TorchOps`. torch runs RMSNorm as five kernels and rotary-then-norm
of q or k as about a dozen; at decode, rows are short and each kernel's cost is mostly
its call, so one pass per row pays (measured in docs/performance.md, "The CPU kernels").
"""

import torch

from .kernels import load_library
from ..model.gpt import TorchOps


def _check(status: int) -> None:
    if status:
        raise MemoryError("a CPU kernel could not allocate its scratch row")


class CpuOps:
    @staticmethod
    def rms_norm(x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        # rows of a 2-D view may be spaced apart (the kernel takes a row stride); other
        # shapes are flattened to rows, copied where they cannot be viewed so
        rows = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, dim).contiguous()
        out = torch.empty(x.shape, dtype=x.dtype)
        _check(load_library().rms_norm(rows.data_ptr(), out.data_ptr(), rows.shape[0], dim, rows.stride(0),
                                       torch.finfo(x.dtype).eps, x.dtype == torch.bfloat16))
        return out

    @staticmethod
    def rotary_norm(cos_table, sin_table, positions):
        positions = positions.to(torch.int64).contiguous()  # what the kernel reads; no copy in the engine
        kernel = load_library().rotary_rms_norm
        half = cos_table.shape[1]

        def rotate_and_norm(x, heads, scale):
            n = x.shape[0]
            if x.stride(-1) != 1:
                x = x.contiguous()
            out = torch.empty(n, heads, 2 * half, dtype=x.dtype)
            _check(kernel(x.data_ptr(), x.stride(0), cos_table.data_ptr(), sin_table.data_ptr(),
                          positions.data_ptr(), out.data_ptr(), n, heads, 2 * half,
                          torch.finfo(x.dtype).eps, scale, x.dtype == torch.bfloat16))
            return out
        return rotate_and_norm

    @staticmethod
    def relu_squared_(x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            return TorchOps.relu_squared_(x)
        load_library().relu_squared(x.data_ptr(), x.numel(), x.dtype == torch.bfloat16)
        return x
