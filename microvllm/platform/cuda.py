"""CudaPlatform: flash_attn or our Triton kernel for attention, CUDA graphs for decodes."""

import logging

import torch

from ..model.attention import AttentionBackend, FlashDecodeAttention, FlashPagedAttention
from .base import Platform, importable

logger = logging.getLogger(__name__)


class CudaPlatform(Platform):
    def auto_attention_backend(self, dtype: torch.dtype) -> str:
        if dtype in (torch.float16, torch.bfloat16) and importable("flash_attn"):
            return "flash_attn"
        return "triton" if importable("triton") else "sdpa"

    def attention_backend(self, name: str, dtype: torch.dtype) -> AttentionBackend:
        if name == "auto":
            name = self.auto_attention_backend(dtype)
        if name != "flash_attn":
            return super().attention_backend(name, dtype)
        if not importable("flash_attn"):
            raise ValueError(self.unavailable_backend(name))
        if dtype not in (torch.float16, torch.bfloat16):  # flash_attn computes in nothing else
            raise ValueError(f"attention_backend='flash_attn' needs dtype float16 or bfloat16, "
                             f"got {dtype}; use 'triton', 'sdpa' or 'auto'")
        # flash_attn reads a paged cache only in pages of a multiple of 256 tokens
        return AttentionBackend("flash_attn", FlashPagedAttention, FlashDecodeAttention, block_size_multiple=256)

    def uses_decode_graphs(self, enforce_eager: bool, attention_backend: str, max_model_len: int) -> bool:
        """Unless enforce_eager; with the SDPA backend too (graphs beat eager launches),
        but the user is told its cost."""
        if enforce_eager:
            return False
        if attention_backend == "sdpa":
            logger.warning(f"CUDA graphs with attention_backend='sdpa': its decode twin reads all "
                           f"max_model_len={max_model_len} keys of every sequence on full-attention "
                           "layers, whatever the context; pip install triton (or flash_attn) for a "
                           "decode that reads only each sequence's context, or pass enforce_eager=True")
        return True
