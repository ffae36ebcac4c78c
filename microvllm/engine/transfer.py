"""Host arrays to the device in one copy.

A step's index arrays are packed into one int64 buffer, which the platform moves to
the device as it moves best (on CUDA: one non-blocking copy from pinned memory, instead
of a stall of the host per array; on the CPU the arrays are used where they lie).
Float arrays travel bit for bit inside the int64 buffer.
"""

import numpy as np
import torch

from ..platform import host_to_device


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The same arrays (int64 or float64, any shape) as tensors on `device`."""
    flat = np.concatenate([a.astype(a.dtype if a.dtype == np.float64 else np.int64, copy=False)
                           .reshape(-1).view(np.int64) for a in arrays.values()])
    packed = host_to_device(torch.from_numpy(flat), device)
    tensors, start = {}, 0
    for name, a in arrays.items():
        t = packed[start:start + a.size].view(a.shape)
        tensors[name] = t.view(torch.float64) if a.dtype == np.float64 else t
        start += a.size
    return tensors
