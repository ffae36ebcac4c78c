"""The paged KV cache and the per-step view of it that attention reads through.

PagedKVCache owns one K and one V pool per layer, each `[num_blocks, block_size,
n_kv_head, head_dim]`. A token's KV lives at `slot = block_id * block_size + offset`;
which blocks a sequence owns is the BlockManager's business, recorded in its block table.

SequenceKVView binds the cache to the sequences of one step: where each new token's KV
goes (slot mapping) and which slots each sequence may read (block tables, context
lengths). DecodeKVView does the same for a step of single-token decodes held in
fixed-size device buffers, with no host-side lengths, so a CUDA graph can replay it.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..platform.base import Platform


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str, allocate=None):
        """`allocate(shape, dtype)`: a zero-filled pool, the platform's kv_pool (by default
        the base platform's, torch.zeros on `device`)."""
        # one block past those the BlockManager hands out takes the K/V that padded
        # rows of a fixed-size batch write, so they land where no sequence reads
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        allocate = allocate or Platform(torch.device(device)).kv_pool
        self.k, self.v = allocate(shape, dtype), allocate(shape, dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.padding_block = num_blocks

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size

    def copy_blocks(self, sources: list[int], destinations: list[int]) -> None:
        """Copy whole blocks, every layer's K and V: one indexed copy per pool for the lot."""
        src = torch.tensor(sources, device=self.k.device)
        dst = torch.tensor(destinations, device=self.k.device)
        self.k.index_copy_(1, dst, self.k.index_select(1, src))
        self.v.index_copy_(1, dst, self.v.index_select(1, src))

    def flat_pools(self, layer_idx: int):
        """K and V of one layer as `[num_slots, n_kv_head, head_dim]`, indexable by slot."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])


class _KVWriter:
    """What both views share: a `cache` and the `slot_mapping` of the step's new tokens."""

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k_pool, v_pool = self.cache.flat_pools(layer_idx)
        k_pool.index_copy_(0, self.slot_mapping, k)
        v_pool.index_copy_(0, self.slot_mapping, v)


@dataclass
class SequenceKVView(_KVWriter):
    cache: PagedKVCache
    slot_mapping: torch.Tensor    # [num_tokens] where each new token's K/V is written
    block_tables: torch.Tensor    # [num_seqs, max_blocks] (padded with block 0)
    query_lens: list[int]         # new tokens of each sequence this step
    context_lens: list[int]       # keys each sequence sees, its new tokens included
    # the same lengths as [num_seqs + 1] running sums on the device, for kernels; the
    # engine sends them with the step's other inputs (built here only when not given)
    cu_query_lens: torch.Tensor | None = None
    cu_context_lens: torch.Tensor | None = None

    def __post_init__(self):
        device = self.slot_mapping.device
        cumulative = lambda lengths: torch.tensor(np.cumsum([0, *lengths]), device=device)
        if self.cu_query_lens is None:
            self.cu_query_lens = cumulative(self.query_lens)
        if self.cu_context_lens is None:
            self.cu_context_lens = cumulative(self.context_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)


@dataclass
class DecodeKVView(_KVWriter):
    cache: PagedKVCache
    slot_mapping: torch.Tensor    # [num_seqs] where each sequence's new K/V is written
    block_tables: torch.Tensor    # [num_seqs, max_blocks_per_seq], every row as wide as max_model_len needs
    context_lens: torch.Tensor    # [num_seqs] keys each sequence sees, its new token included

    @property
    def max_context_len(self) -> int:
        """A bound on every context, known without reading the device."""
        return self.block_tables.shape[1] * self.block_size
