"""CpuPlatform: the C decode kernel and fused ops, packed linears, a KV cache in
anonymous memory, numpy's argmax and the C kernel's sampling noise. The CPU's own code sits in microvllm/cpu/."""

import logging
import math
import mmap

import torch

from ..cpu.kernels import available as cpu_kernels_available, load_library
from ..cpu.linear import native_bfloat16, pack_linears, packs_linears
from ..cpu.threads import apply_cpu_threads
from ..model.attention import AttentionBackend, SdpaDecodeAttention
from ..model.gpt import GPT
from .base import Platform

# the KV bytes written at start-up (the lowest blocks, which the block manager hands out
# first): a first write to a page costs a page fault, which the first generate of a
# fresh process would otherwise pay (measurements in docs/performance.md)
PREWRITTEN_KV_BYTES = 128 * 2**20

logger = logging.getLogger(__name__)


def default_cpu_dtype() -> torch.dtype:
    # float32 on CPUs without bfloat16 instructions: their bfloat16 matmuls are slower
    return torch.bfloat16 if native_bfloat16() else torch.float32


class CpuPlatform(Platform):
    name = "cpu"
    # the cache's pages are committed on first write, and a first write costs page faults:
    # reusing the blocks a run has touched keeps RAM at the workload's peak, at the price
    # of fewer prefixes of finished requests staying cached
    reuse_freed_blocks_first = True

    def default_dtype(self) -> torch.dtype:
        return default_cpu_dtype()

    def runnable_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """float16 runs as bfloat16, as vLLM's CPU backend casts it: the CPU kernels have no
        float16 path (torch's runs several times slower than the default), and bfloat16 is
        the other 16-bit float nanochat trains in."""
        if dtype is not torch.float16:
            return dtype
        logger.warning("float16 is not supported on CPU: running bfloat16 instead, as vLLM does "
                       "(dtype='auto' picks this CPU's fastest, %s)", str(default_cpu_dtype()).removeprefix("torch."))
        return torch.bfloat16

    def start(self, cpu_threads: int | None) -> None:
        apply_cpu_threads(cpu_threads)

    def cannot_run(self, name: str, dtype: torch.dtype) -> str | None:
        if name == "cpu" and cpu_kernels_available(dtype):
            return None
        return super().cannot_run(name, dtype)

    def backend(self, name: str) -> AttentionBackend:
        if name != "cpu":
            return super().backend(name)
        from ..cpu.attention import MAX_KERNEL_QUERY_LEN, CpuPagedAttention
        return AttentionBackend(name, CpuPagedAttention, SdpaDecodeAttention, exact_chunk_rows=MAX_KERNEL_QUERY_LEN)

    def prepare_model(self, model: GPT, backend: AttentionBackend, quantization: str | None) -> GPT:
        if backend.name == "cpu":  # its C library fuses the forward's norms and rotary too
            from ..cpu.ops import CpuOps
            model.ops = CpuOps
        # quantized layers keep their own int8 / fp8 kernels
        if quantization is None and packs_linears(next(model.parameters()).dtype):
            pack_linears(model)
        return super().prepare_model(model, backend, quantization)

    def kv_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zero-filled as the base's, but an anonymous map, which the kernel hands out as
        zero pages on first touch: torch.zeros would write every byte at start-up and make
        the whole pool resident, while a run only touches the blocks it uses."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        # private, so that a forked child does not share the cache; Windows' maps are private already
        flags = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
        pool = mmap.mmap(-1, nbytes, **flags)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # decodes touch a new page every few tokens: as 2 MiB pages, 512x fewer faults
            pool.madvise(mmap.MADV_HUGEPAGE)
        # the tensor holds the map, which is unmapped when the last view of it goes
        return torch.frombuffer(pool, dtype=dtype).view(shape)

    def prewrite_kv(self, pools: tuple[torch.Tensor, ...], bytes_per_block: int) -> None:
        first = PREWRITTEN_KV_BYTES // bytes_per_block
        for pool in pools:
            pool[:, :first].zero_()

    @staticmethod
    def argmax(x: torch.Tensor) -> torch.Tensor:
        """numpy's argmax, several times faster than torch's over a large vocabulary."""
        if x.dtype in (torch.float32, torch.float64):
            return torch.from_numpy(x.numpy().argmax(axis=-1))
        return x.argmax(dim=-1)

    @property
    def sampling_noise(self):
        """The C kernel's: one pass where the torch ops make a dozen over [rows, vocab]."""
        if load_library() is None:
            return None
        from ..cpu.sampling import uniform_noise
        return uniform_noise
