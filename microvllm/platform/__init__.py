"""The device's platform (base.py), chosen once at start-up by `platform_for`."""

import torch

from ..model.attention import AttentionBackend
from .base import Platform
from .cpu import CpuPlatform
from .cuda import CudaPlatform


def platform_for(device: torch.device) -> Platform:
    return (CudaPlatform if device.type == "cuda" else CpuPlatform)(device)


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The backend that `attention_backend=name` means on `device` for a `dtype` cache."""
    return platform_for(device).attention_backend(name, dtype)


__all__ = ["Platform", "CpuPlatform", "CudaPlatform", "platform_for", "resolve_attention_backend"]
