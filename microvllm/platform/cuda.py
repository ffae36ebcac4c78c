"""CudaPlatform: flash_attn or our Triton kernel for attention, CUDA graphs for decodes,
pinned host memory and non-blocking copies, CUDA events to time steps, and the card's
free memory for the KV cache."""

import logging
from typing import Callable

import torch

from ..model.attention import AttentionBackend, FlashDecodeAttention, FlashPagedAttention
from .base import Capture, Platform, importable

logger = logging.getLogger(__name__)
GIB = 1024**3


class CudaPlatform(Platform):
    name = "cuda"
    sizes_kv_cache_by_free_memory = True

    def cannot_run(self, name: str, dtype: torch.dtype) -> str | None:
        if name != "flash_attn" or not importable("flash_attn"):
            return super().cannot_run(name, dtype)
        if dtype not in (torch.float16, torch.bfloat16):  # flash_attn computes in nothing else
            return (f"attention_backend='flash_attn' needs dtype float16 or bfloat16, "
                    f"got {dtype}; use 'triton', 'sdpa' or 'auto'")
        return None

    def backend(self, name: str) -> AttentionBackend:
        if name != "flash_attn":
            return super().backend(name)
        # flash_attn reads a paged cache only in pages of a multiple of 256 tokens
        return AttentionBackend("flash_attn", FlashPagedAttention, FlashDecodeAttention, block_size_multiple=256)

    def runs_triton_kernels(self) -> bool:
        return True

    def memory_bytes(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def describe_memory(self) -> str:
        free, total = torch.cuda.mem_get_info(self.device)
        return f"; GPU memory in use: {(total - free) / GIB:.1f} of {total / GIB:.1f} GiB ({1 - free / total:.0%})"

    @staticmethod
    def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One non-blocking copy from pinned memory: a copy from ordinary (pageable) memory
        makes the host wait until the GPU has run everything queued before it. PyTorch's
        pinned allocator keeps the buffer until the copy is done."""
        return host.pin_memory().to(device, non_blocking=True)

    def host_buffer(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=True)

    def copy_fence(self):
        return torch.cuda.Event()

    def device_clock(self) -> Callable[[], float]:
        """CUDA events: reading the clock waits for the work queued before it."""
        start = torch.cuda.Event(enable_timing=True)
        start.record()

        def elapsed() -> float:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return elapsed

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

    def graph_capture(self) -> Capture:
        """Graphs recorded into one shared memory pool."""
        pool = torch.cuda.graph_pool_handle()

        def capture(forward):
            # a warm-up outside the recording compiles kernels and sets up library
            # workspaces, which a graph cannot record
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = forward()

            def replay():
                graph.replay()
                return output
            return replay
        return capture


# the card's memory, as the KV cache's sizing measures it (engine/memory.py)

def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on the card, once PyTorch has given back the blocks it caches."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)


def peak_bytes(device: torch.device, run: Callable[[], object]) -> int:
    """Peak bytes that `run()` allocates beyond what it keeps (it keeps nothing)."""
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    run()
    return torch.cuda.max_memory_allocated(device) - allocated_before
