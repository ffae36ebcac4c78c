"""Platform: everything that differs between devices, chosen once when an engine is built.

The engine asks its platform for the default dtype, the attention backend, the model's
norm/rotary kernels and linear layers, the KV cache's memory and how much of it there
is room for, which free KV block to reuse first, the argmax and noise the sampler runs,
how host arrays reach the device, how a step is timed and how decode graphs are
captured; nothing else in the engine, block manager, KV cache or sampler branches on
the device. The base class holds what every device shares (the SDPA and Triton
backends, torch's ops and allocation, the host's clock); CpuPlatform (cpu.py) and
CudaPlatform (cuda.py) change what their device does better.
"""

import importlib
import os
import time
from typing import Callable

import torch

from ..model.attention import (ATTENTION_BACKENDS, AttentionBackend, SdpaDecodeAttention,
                               SdpaPagedAttention)
from ..model.gpt import GPT
from ..model.quantization import quantize_linears

# what attention_backend="auto" means on each platform: the first of these that runs there
AUTO_ATTENTION_BACKENDS = {"cpu": ("cpu", "sdpa"), "cuda": ("flash_attn", "triton", "sdpa")}

# capture(forward) -> replay; replay() returns what forward() returned, recomputed
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


class Platform:
    name: str  # its key in AUTO_ATTENTION_BACKENDS and platform.PLATFORMS
    # which free KV block an allocation takes: False, a never-used one before a freed one
    # (cached prefixes live longest); True, the least recently freed one first
    reuse_freed_blocks_first = False
    # whether the default KV cache takes what the device's free memory leaves (after a
    # profiled step) rather than room for max_num_seqs full-length sequences
    sizes_kv_cache_by_free_memory = False

    def __init__(self, device: torch.device):
        self.device = device

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def runnable_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype an engine asked for `dtype` runs here."""
        return dtype

    def start(self, cpu_threads: int | None) -> None:
        """Settings of the process that the engine's speed depends on."""

    # -- attention ----------------------------------------------------------------------

    def attention_backend(self, name: str, dtype: torch.dtype) -> AttentionBackend:
        """The backend that `attention_backend=name` means here for a `dtype` cache."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
        if name == "auto":
            name = next(n for n in AUTO_ATTENTION_BACKENDS[self.name] if self.cannot_run(n, dtype) is None)
        problem = self.cannot_run(name, dtype)
        if problem is not None:
            raise ValueError(problem)
        return self.backend(name)

    def cannot_run(self, name: str, dtype: torch.dtype) -> str | None:
        """Why backend `name` cannot run here over a `dtype` cache (what to use instead),
        or None where it can."""
        if name == "sdpa":
            return None
        if name == "triton":
            # on CPU tensors Triton kernels run only in its (slow) interpreter, meant for tests
            if importable("triton") and self.runs_triton_kernels():
                return None
            return ("attention_backend='triton' needs the triton package and a CUDA "
                    "device (or TRITON_INTERPRET=1 on CPU); use 'sdpa' or 'auto'")
        return {"cpu": "attention_backend='cpu' needs device='cpu', dtype 'float32' or 'bfloat16', "
                       "and a C compiler (cc, or $CC) to build its kernel; use 'sdpa' or 'auto'",
                "flash_attn": "attention_backend='flash_attn' needs a CUDA device and the "
                              "flash_attn package; use 'sdpa' or 'auto'"}[name]

    def backend(self, name: str) -> AttentionBackend:
        """Backend `name`, which cannot_run has let through."""
        if name == "triton":
            from ..model.attention.triton import TritonDecodeAttention, TritonPagedAttention
            return AttentionBackend("triton", TritonPagedAttention, TritonDecodeAttention)
        return AttentionBackend(name, SdpaPagedAttention, SdpaDecodeAttention)

    def runs_triton_kernels(self) -> bool:
        return os.environ.get("TRITON_INTERPRET") == "1"

    def prepare_model(self, model: GPT, backend: AttentionBackend, quantization: str | None) -> GPT:
        """The loaded model with this device's kernels and linear layers swapped in."""
        return quantize_linears(model, quantization) if quantization is not None else model

    # -- memory ---------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """All of the device's memory, in bytes (the host's RAM)."""
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def describe_memory(self) -> str:
        """What the KV cache line adds about the device's memory: nothing here."""
        return ""

    def kv_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled KV pool (zeros: a padded read of an unused slot is masked out,
        but a NaN there would still poison the output, as 0 * NaN = NaN)."""
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def prewrite_kv(self, pools: tuple[torch.Tensor, ...], bytes_per_block: int) -> None:
        """Touch what the first steps will write, where a first write is slow."""

    # -- a step's work ------------------------------------------------------------------

    @staticmethod
    def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host tensor where `device`'s kernels read it: here, where it lies."""
        return host

    def host_buffer(self, size: int) -> torch.Tensor:
        """An int64 host buffer that copies to the device from (decode graphs' inputs)."""
        return torch.empty(size, dtype=torch.int64)

    def copy_fence(self):
        """An event that record() marks after a queued copy and synchronize() waits on, or
        None where a copy is done when it returns."""
        return None

    def device_clock(self) -> Callable[[], float]:
        """Starts a clock of the device's work: the returned function gives the seconds
        since. Here the host does the work: wall time."""
        start = time.perf_counter()
        return lambda: time.perf_counter() - start

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

    def graph_capture(self) -> Capture:
        raise ValueError(f"decode graphs are captured on a CUDA device, not {self.device}")


def importable(module: str) -> bool:
    # an import, not a spec lookup: a wheel built for another torch or CUDA fails here
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
