"""The sampler's noise through the C kernel: the same uniforms as the sampler's torch
ops, without their dozen passes over [rows, tokens] int64 tensors."""

import torch

from .kernels import load_library


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """engine.sampler.uniform_noise, for CPU tensors."""
    seeds, positions, token_ids = seeds.contiguous(), positions.contiguous(), token_ids.contiguous()
    width = token_ids.shape[-1]
    out = torch.empty(len(seeds), width, dtype=torch.float64)
    load_library().uniform_noise(seeds.data_ptr(), positions.data_ptr(), token_ids.data_ptr(),
                                 width if token_ids.dim() == 2 else 0, len(seeds), width, out.data_ptr())
    return out
