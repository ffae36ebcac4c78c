"""Platform: everything that differs between devices, chosen once when an engine is built.

The engine asks its platform for the default dtype, the attention backend, the model's
norm/rotary kernels and linear layers, the KV cache's memory, which free KV block to
reuse first, and the argmax and noise the sampler runs; nothing else in the engine, block manager,
KV cache or sampler branches on the device. The base class holds what every device
shares (the SDPA and Triton backends, torch's ops and allocation); CpuPlatform (cpu.py)
and CudaPlatform (cuda.py) change what their device does better.
"""

import importlib
import os

import torch

from ..model.attention import (ATTENTION_BACKENDS, AttentionBackend, SdpaDecodeAttention,
                               SdpaPagedAttention)
from ..model.gpt import GPT
from ..model.quantization import quantize_linears


class Platform:
    # which free KV block an allocation takes: False, a never-used one before a freed one
    # (cached prefixes live longest); True, the least recently freed one first
    reuse_freed_blocks_first = False

    def __init__(self, device: torch.device):
        self.device = device

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def start(self, cpu_threads: int | None) -> None:
        """Settings of the process that the engine's speed depends on."""

    def attention_backend(self, name: str, dtype: torch.dtype) -> AttentionBackend:
        """The backend that `attention_backend=name` means here for a `dtype` cache."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
        if name == "auto":
            name = self.auto_attention_backend(dtype)
        if name == "triton":
            return self.triton_backend()
        if name != "sdpa":
            raise ValueError(self.unavailable_backend(name))
        return AttentionBackend(name, SdpaPagedAttention, SdpaDecodeAttention)

    def auto_attention_backend(self, dtype: torch.dtype) -> str:
        return "sdpa"

    def unavailable_backend(self, name: str) -> str:
        return {"cpu": "attention_backend='cpu' needs device='cpu', dtype 'float32' or 'bfloat16', "
                       "and a C compiler (cc, or $CC) to build its kernel; use 'sdpa' or 'auto'",
                "flash_attn": "attention_backend='flash_attn' needs a CUDA device and the "
                              "flash_attn package; use 'sdpa' or 'auto'"}[name]

    def triton_backend(self) -> AttentionBackend:
        # on CPU tensors Triton kernels run only in its (slow) interpreter, meant for tests
        if not importable("triton") or not (self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("attention_backend='triton' needs the triton package and a CUDA "
                             "device (or TRITON_INTERPRET=1 on CPU); use 'sdpa' or 'auto'")
        from ..model.attention.triton import TritonDecodeAttention, TritonPagedAttention
        return AttentionBackend("triton", TritonPagedAttention, TritonDecodeAttention)

    def prepare_model(self, model: GPT, backend: AttentionBackend, quantization: str | None) -> GPT:
        """The loaded model with this device's kernels and linear layers swapped in."""
        return quantize_linears(model, quantization) if quantization is not None else model

    def kv_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled KV pool (zeros: a padded read of an unused slot is masked out,
        but a NaN there would still poison the output, as 0 * NaN = NaN)."""
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def prewrite_kv(self, pools: tuple[torch.Tensor, ...], bytes_per_block: int) -> None:
        """Touch what the first steps will write, where a first write is slow."""

    @staticmethod
    def argmax(x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)

    @property
    def sampling_noise(self):
        """A faster twin of the sampler's uniform_noise (the same uniforms), or None."""
        return None

    def uses_decode_graphs(self, enforce_eager: bool, attention_backend: str, max_model_len: int) -> bool:
        """Whether decode steps replay CUDA graphs."""
        return False


def importable(module: str) -> bool:
    # an import, not a spec lookup: a wheel built for another torch or CUDA fails here
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
