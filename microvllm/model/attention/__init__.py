"""Attention backends: how a layer's queries meet their keys, one module per backend.

- sdpa.py: torch SDPA over gathered blocks; any device, the reference paged path.
- flash.py: flash_attn's kernels reading the block table (CUDA).
- triton.py: our own Triton kernel over the block table (CUDA), imported only when chosen.
- the CPU's backend (C decode kernel, SDPA prefill) sits with the other CPU code, in
  microvllm/cpu/attention.py.
- dense.py: no cache, B equal-length sequences: training and the tests' reference.
Which backend runs is the platform's choice (microvllm/platform/).
"""

from .base import ATTENTION_BACKENDS, DEFAULT_BLOCK_SIZE, AttentionBackend, window_mask
from .dense import DenseCausalAttention
from .flash import FlashDecodeAttention, FlashPagedAttention
from .sdpa import SdpaDecodeAttention, SdpaPagedAttention

__all__ = ["ATTENTION_BACKENDS", "DEFAULT_BLOCK_SIZE", "AttentionBackend", "window_mask",
           "DenseCausalAttention", "FlashDecodeAttention", "FlashPagedAttention",
           "SdpaDecodeAttention", "SdpaPagedAttention"]
