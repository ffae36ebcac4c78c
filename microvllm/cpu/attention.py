"""CPU attention: decodes read the paged cache in place through a small C kernel.

A decode's attention is bound by memory traffic: SDPA over the paged cache first
gathers every visible key and value into a padded copy, then reads that copy (twice,
where the gathered layout is not the one its kernel wants). `paged_decode.c` reads each
key and value once, where it lies, so a decode step's attention costs a fraction of
that. Prefill chunks do enough arithmetic per key that the gather does not matter;
they stay on SDPA.

The kernel is one of microvllm's C kernels (`kernels.py`: built on first use,
called through ctypes, which releases the GIL, so a batch is split across torch's
thread count). Where they cannot be built, the `auto` backend stays on SDPA.
"""

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

from ..model.attention import SdpaPagedAttention
from .kernels import load_library


@cache
def _thread_pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="microvllm-attention")


def _split(context_lens: list[int], parts: int) -> list[tuple[int, int]]:
    """Consecutive sequence ranges with about equal numbers of keys."""
    if parts == 1:
        return [(0, len(context_lens))]
    total, bounds, running = sum(context_lens), [0], 0
    for i, n in enumerate(context_lens):
        running += n
        if running * parts >= total * len(bounds) and len(bounds) < parts:
            bounds.append(i + 1)
    if bounds[-1] != len(context_lens):
        bounds.append(len(context_lens))
    return list(zip(bounds, bounds[1:]))


class CpuPagedAttention:
    """The step's leading single-token sequences (decodes, and prompts whose last chunk
    is one token) go through the kernel; the prefill chunks after them through SDPA."""

    # below this many keys in a step, one thread is quicker than handing work out
    MIN_KEYS_PER_THREAD = 4096

    def __init__(self, view):
        self.view = view
        query_lens = view.query_lens
        self.slots = view.slot_mapping.to(torch.int64).contiguous()  # no copy in the engine
        self.num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        self.prefill = SdpaPagedAttention(view, self.num_decodes) if self.num_decodes < len(query_lens) else None
        if self.num_decodes:
            decode_lens = view.context_lens[:self.num_decodes]
            self.context_lens = torch.tensor(decode_lens, dtype=torch.int64)
            self.block_tables = view.block_tables[:self.num_decodes].to(torch.int64).contiguous()
            parts = min(torch.get_num_threads(), max(1, sum(decode_lens) // self.MIN_KEYS_PER_THREAD))
            self.ranges = _split(decode_lens, parts)

    def __call__(self, layer_idx, q, k, v, window):
        self._write(layer_idx, k, v)
        if not self.num_decodes:
            return self.prefill.attend_step(layer_idx, q, window)
        q = q.contiguous()
        out = torch.empty_like(q)
        self._decode(layer_idx, q, out, window)
        if self.prefill:
            self.prefill.attend(layer_idx, q, window, out)
        return out

    def _write(self, layer_idx, k, v):
        # a row at a time (torch's index_copy_ on CPU copies element by element)
        scatter, slots = load_library().scatter_rows, self.slots
        for new, pool in ((k, self.view.cache.k[layer_idx]), (v, self.view.cache.v[layer_idx])):
            if new.stride(2) != 1 or new.stride(1) != new.shape[2]:
                new = new.contiguous()
            row_bytes = new.shape[1] * new.shape[2] * new.element_size()
            scatter(new.data_ptr(), new.stride(0) * new.element_size(), pool.data_ptr(), slots.data_ptr(),
                    new.shape[0], row_bytes)

    def _decode(self, layer_idx, q, out, window):
        cache, (_, n_head, head_dim) = self.view.cache, q.shape
        kernel = load_library().paged_decode_attention
        args = (q.data_ptr(), cache.k[layer_idx].data_ptr(), cache.v[layer_idx].data_ptr(),
                self.block_tables.data_ptr(), self.context_lens.data_ptr(), out.data_ptr())
        shape = (self.block_tables.shape[1], n_head, cache.k.shape[3], head_dim, cache.block_size,
                 -1 if window is None else window, head_dim ** -0.5, int(q.dtype == torch.bfloat16))
        call = lambda first, end: kernel(*args, first, end, *shape)
        if len(self.ranges) == 1:
            results = [call(*self.ranges[0])]
        else:
            results = list(_thread_pool(torch.get_num_threads()).map(lambda r: call(*r), self.ranges))
        if any(results):
            raise MemoryError("the CPU decode attention kernel could not allocate its scratch memory")
