"""Host arrays to the device in one copy, without stalling the host.

A copy from ordinary (pageable) host memory makes the host wait until the GPU has run
everything queued before it, and a step's index arrays used to cost one such wait
each. `to_device` packs a step's arrays into one pinned buffer and queues a single
non-blocking copy; PyTorch's pinned allocator keeps that buffer until the copy is
done, so it may be dropped at once. Float arrays travel bit for bit inside the int64
buffer. On the CPU the arrays are used where they lie.
"""

import numpy as np
import torch


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The same arrays (int64 or float64, any shape) as tensors on `device`."""
    flat = np.concatenate([a.astype(a.dtype if a.dtype == np.float64 else np.int64, copy=False)
                           .reshape(-1).view(np.int64) for a in arrays.values()])
    packed = torch.from_numpy(flat)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    tensors, start = {}, 0
    for name, a in arrays.items():
        t = packed[start:start + a.size].view(a.shape)
        tensors[name] = t.view(torch.float64) if a.dtype == np.float64 else t
        start += a.size
    return tensors
