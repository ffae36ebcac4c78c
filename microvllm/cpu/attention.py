"""CPU attention: decodes and short query chunks read the paged cache in place through a C kernel.

A decode's attention is bound by memory traffic: SDPA over the paged cache first
gathers every visible key and value into a padded copy, then reads that copy (twice,
where the gathered layout is not the one its kernel wants). `paged_attention.c` reads
each key and value once, where it lies, for a chunk of query tokens at the end of a
sequence's context: a decode (one token), a speculative check (the token and its
guesses), a prefill chunk. A chunk goes through the kernel when it is short (up to
MAX_KERNEL_QUERY_LEN tokens) or a whole prompt's first chunk up to MAX_KERNEL_PROMPT_LEN
tokens (no keys before its queries, half of them masked, which the kernel skips); longer
chunks do enough arithmetic per key that SDPA's matrix products win over the gather
they pay for. Both limits are where the two paths cross in `benchmarks/chunk_attention.py`
(docs/performance.md).

The kernel is one of microvllm's C kernels (`kernels.py`: built on first use,
called through ctypes, which releases the GIL, so a step's work is split across torch's
thread count). Where they cannot be built, the `auto` backend stays on SDPA.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cache

import numpy as np
import torch

from ..arithmetic import cdiv
from ..model.attention import SdpaPagedAttention
from .kernels import load_library

# the longest chunk of new tokens after cached ones that the kernel takes, and the longest
# first chunk of a prompt; SDPA takes longer ones
MAX_KERNEL_QUERY_LEN = 24
MAX_KERNEL_PROMPT_LEN = 512

# a work item's query rows: its scores (rows x heads x keys) stay within L2 up to
# contexts of a few thousand keys, and every item re-reads its keys
ROWS_PER_ITEM = 16


@cache
def _thread_pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="microvllm-attention")


def _split(costs: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Consecutive ranges of work items with about equal costs (fewer where one item
    outweighs a part)."""
    if parts == 1:
        return [(0, len(costs))]
    running = np.cumsum(costs)
    # range k ends at the first item whose running cost reaches k / parts of the total
    ends = np.searchsorted(running, running[-1] * np.arange(1, parts) / parts) + 1
    bounds = [0, *np.unique(ends[ends < len(costs)]).tolist(), len(costs)]
    return list(zip(bounds, bounds[1:]))


def work_items(seqs: np.ndarray, query_lens: np.ndarray, context_lens: np.ndarray,
               first_tokens: np.ndarray, rows_per_item: int = ROWS_PER_ITEM) -> np.ndarray:
    """The kernel's work items [n, 4] for the sequences `seqs` (block table rows), whose
    queries are the last query_lens[i] positions of their contexts and sit from row
    first_tokens[i] of the step's q on: (block table row, first query row, rows, position
    of the first row), each sequence's queries cut into items of up to rows_per_item rows."""
    if rows_per_item < 1:
        raise ValueError(f"rows_per_item must be >= 1, got {rows_per_item}")
    if query_lens.max(initial=0) <= rows_per_item:  # one item a sequence (decodes, checks): the quick way
        return np.stack([seqs, first_tokens, query_lens, context_lens - query_lens], axis=1).astype(np.int64)
    counts = cdiv(query_lens, rows_per_item)
    starts = np.cumsum(counts) - counts
    offset = (np.arange(counts.sum()) - np.repeat(starts, counts)) * rows_per_item
    rows = np.minimum(rows_per_item, np.repeat(query_lens, counts) - offset)
    positions = np.repeat(context_lens - query_lens, counts) + offset
    return np.stack([np.repeat(seqs, counts), np.repeat(first_tokens, counts) + offset, rows, positions],
                    axis=1).astype(np.int64)


def _sub_view(view, seqs: np.ndarray, tokens: torch.Tensor):
    """The step's SequenceKVView for the sequences `seqs` alone, whose query rows are
    `tokens`: a step of their own."""
    return replace(view, slot_mapping=view.slot_mapping[tokens], block_tables=view.block_tables[torch.from_numpy(seqs)],
                   query_lens=[view.query_lens[i] for i in seqs], context_lens=[view.context_lens[i] for i in seqs],
                   cu_query_lens=None, cu_context_lens=None)


class CpuPagedAttention:
    """Sequences whose chunks the kernel takes (see the module docstring) go through it,
    their work items split over threads; the others through SDPA, over a view of their own."""

    # below this many key-query pairs in a step, one thread is quicker than handing work out
    MIN_KEYS_PER_THREAD = 4096

    def __init__(self, view, max_kernel_query_len: int = MAX_KERNEL_QUERY_LEN,
                 max_kernel_prompt_len: int = MAX_KERNEL_PROMPT_LEN):
        """The limits are the module's unless told (benchmarks move them)."""
        for name, limit in (("max_kernel_query_len", max_kernel_query_len),
                            ("max_kernel_prompt_len", max_kernel_prompt_len)):
            if limit < 0:
                raise ValueError(f"{name} must be >= 0, got {limit}")
        self.view = view
        self.slots = view.slot_mapping.to(torch.int64).contiguous()  # no copy in the engine
        num_seqs = len(view.query_lens)
        query_lens = np.fromiter(view.query_lens, np.int64, num_seqs)
        context_lens = np.fromiter(view.context_lens, np.int64, num_seqs)
        first_tokens = np.cumsum(query_lens) - query_lens
        short = (query_lens <= max_kernel_query_len) | (
            (query_lens == context_lens) & (query_lens <= max_kernel_prompt_len))
        self.kernel_seqs, sdpa_seqs = np.flatnonzero(short), np.flatnonzero(~short)
        self.items = None
        if len(self.kernel_seqs):
            items = work_items(self.kernel_seqs, query_lens[short], context_lens[short], first_tokens[short])
            self.items = torch.from_numpy(items)
            self.block_tables = view.block_tables.to(torch.int64).contiguous()
            costs = items[:, 2] * (items[:, 3] + items[:, 2])
            parts = min(torch.get_num_threads(), max(1, int(costs.sum()) // self.MIN_KEYS_PER_THREAD))
            self.ranges = _split(costs, parts)
        self.prefill, self.prefill_tokens = None, None
        if len(self.kernel_seqs) == 0:
            self.prefill = SdpaPagedAttention(view)
        elif len(sdpa_seqs):
            self.prefill_tokens = torch.from_numpy(np.concatenate(
                [np.arange(first_tokens[i], first_tokens[i] + query_lens[i]) for i in sdpa_seqs]))
            self.prefill = SdpaPagedAttention(_sub_view(view, sdpa_seqs, self.prefill_tokens))

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None) -> torch.Tensor:
        self._write(layer_idx, k, v)
        if self.items is None:
            return self.prefill.attend_step(layer_idx, q, window)
        q = q.contiguous()
        out = torch.empty_like(q)
        self._attend(layer_idx, q, out, window)
        if self.prefill:
            prefill_q = q.index_select(0, self.prefill_tokens)
            out.index_copy_(0, self.prefill_tokens, self.prefill.attend_step(layer_idx, prefill_q, window))
        return out

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # a row at a time (torch's index_copy_ on CPU copies element by element)
        scatter, slots = load_library().scatter_rows, self.slots
        for new, pool in ((k, self.view.cache.k[layer_idx]), (v, self.view.cache.v[layer_idx])):
            if new.stride(2) != 1 or new.stride(1) != new.shape[2]:
                new = new.contiguous()
            row_bytes = new.shape[1] * new.shape[2] * new.element_size()
            scatter(new.data_ptr(), new.stride(0) * new.element_size(), pool.data_ptr(), slots.data_ptr(),
                    new.shape[0], row_bytes)

    def _attend(self, layer_idx: int, q: torch.Tensor, out: torch.Tensor, window: int | None) -> None:
        cache, (_, n_head, head_dim) = self.view.cache, q.shape
        kernel = load_library().paged_attention
        args = (q.data_ptr(), cache.k[layer_idx].data_ptr(), cache.v[layer_idx].data_ptr(),
                self.block_tables.data_ptr(), self.items.data_ptr(), out.data_ptr())
        shape = (self.block_tables.shape[1], n_head, cache.k.shape[3], head_dim, cache.block_size,
                 -1 if window is None else window, head_dim ** -0.5, int(q.dtype == torch.bfloat16))
        call = lambda first, end: kernel(*args, first, end, *shape)
        if len(self.ranges) == 1:
            results = [call(*self.ranges[0])]
        else:
            results = list(_thread_pool(torch.get_num_threads()).map(lambda r: call(*r), self.ranges))
        if any(results):
            raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
