"""The device's platform (base.py), chosen once at start-up by `platform_for`, and what
the engine's generic code asks of the device by name (`host_to_device`, `pick_device`)."""

import torch

from ..model.attention import AttentionBackend
from .base import Platform
from .cpu import CpuPlatform
from .cuda import CudaPlatform

PLATFORMS: dict[str, type[Platform]] = {"cpu": CpuPlatform, "cuda": CudaPlatform}


def platform_for(device: torch.device) -> Platform:
    return PLATFORMS.get(device.type, CpuPlatform)(device)


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The backend that `attention_backend=name` means on `device` for a `dtype` cache."""
    return platform_for(device).attention_backend(name, dtype)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor where `device`'s kernels read it (Platform.host_to_device)."""
    return PLATFORMS.get(device.type, CpuPlatform).host_to_device(host, device)


def pick_device(name: str | torch.device | None) -> torch.device:
    """The device `name` means (None: CUDA where there is one, else the CPU), checked to
    exist here."""
    name = str(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in PLATFORMS:
        raise ValueError(f"device {name!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s): use 'cuda:0' .. "
                         f"'cuda:{torch.cuda.device_count() - 1}'")
    return device


__all__ = ["Platform", "CpuPlatform", "CudaPlatform", "PLATFORMS", "platform_for", "resolve_attention_backend",
           "host_to_device", "pick_device"]
