"""The SDPA backend: torch's scaled_dot_product_attention over the paged cache, on any device.

SdpaPagedAttention writes the step's K/V into the paged cache, then gathers each
sequence's key blocks with one indexed read per layer and group, and runs SDPA.
Sequences come sorted (decodes first, then by context length) and are cut into a few
padded groups of similar lengths, so a long prefill chunk or context does not pad every
other sequence to its size. SdpaDecodeAttention is its decode twin for CUDA graphs.
"""

import torch
import torch.nn.functional as F

from ...arithmetic import cdiv
from .base import window_mask


class _PaddedGroup:
    """Consecutive sequences of a step, padded to common query and key lengths.

    Keys are read a whole block at a time, starting at the first block that the
    sequence's earliest query can see, so sliding-window layers read only their window.
    Positions past a sequence's context fall outside every causal mask.
    """

    def __init__(self, view, first_seq: int, last_seq: int, first_token: int):
        device = view.slot_mapping.device
        query_lens = view.query_lens[first_seq:last_seq]
        self.context_lens = view.context_lens[first_seq:last_seq]
        self.first_query_pos = [c - q for c, q in zip(self.context_lens, query_lens)]
        q_lens = torch.tensor(query_lens, device=device)
        q_starts = first_token + torch.cumsum(q_lens, 0) - q_lens
        # padded query rows repeat the sequence's last query, so no mask row is empty
        offsets = torch.arange(max(query_lens), device=device)
        j = torch.minimum(offsets, (q_lens - 1).unsqueeze(1))
        self.query_valid = offsets < q_lens.unsqueeze(1)
        self.query_index = q_starts.unsqueeze(1) + j
        self.query_pos = torch.tensor(self.first_query_pos, device=device).unsqueeze(1) + j
        self.all_valid = all(n == query_lens[0] for n in query_lens)
        self.block_tables = view.block_tables[first_seq:last_seq]
        self.block_size = view.block_size
        self._keys = {}

    def keys(self, window: int | None):
        """(block ids [B, n], mask [B, 1, Q, n * block_size] or None) for this window.

        The mask is None where plain causal attention is exact (fresh prompts that the
        window covers whole), so SDPA can skip the masked half instead of computing it.
        """
        if window not in self._keys:
            bs, device = self.block_size, self.block_tables.device
            first_blocks = [0 if window is None else max(0, pos - window) // bs
                            for pos in self.first_query_pos]
            num_blocks = max(cdiv(ctx, bs) - first for ctx, first in zip(self.context_lens, first_blocks))
            first = torch.tensor(first_blocks, device=device).unsqueeze(1)
            block_index = (first + torch.arange(num_blocks, device=device)).clamp(
                max=self.block_tables.shape[1] - 1)
            key_pos = first * bs + torch.arange(num_blocks * bs, device=device)
            plain_causal = not any(self.first_query_pos) and (
                window is None or window >= max(self.context_lens) - 1)
            mask = None if plain_causal else window_mask(self.query_pos, key_pos, window).unsqueeze(1)
            self._keys[window] = self.block_tables.gather(1, block_index), mask
        return self._keys[window]


def _take_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source[index] for a 2-D index; index_select is the fastest gather on CPU."""
    return source.index_select(0, index.flatten()).view(*index.shape, *source.shape[1:])


class SdpaPagedAttention:
    # a group's longest context is at most this factor (or this many keys) past its
    # shortest, bounding the work spent on padding at a few SDPA calls per layer
    GROUP_CONTEXT_RATIO = 2
    GROUP_CONTEXT_SLACK = 128

    def __init__(self, view):
        self.view = view
        self.groups = []
        query_lens, context_lens = view.query_lens, view.context_lens
        first_seq, first_token = 0, 0
        # a group is decodes, fresh prompts or chunk continuations: one continuation (keys
        # before its first query) would cost a group of fresh prompts their plain causal SDPA
        kind = [(q == 1, q == c) for q, c in zip(query_lens, context_lens)]
        for i in range(first_seq + 1, len(query_lens) + 1):
            if i < len(query_lens) and kind[i] == kind[first_seq] and \
                    context_lens[i] <= max(self.GROUP_CONTEXT_RATIO * context_lens[first_seq],
                                           context_lens[first_seq] + self.GROUP_CONTEXT_SLACK):
                continue
            self.groups.append(_PaddedGroup(view, first_seq, i, first_token))
            first_token += sum(query_lens[first_seq:i])
            first_seq = i

    def __call__(self, layer_idx, q, k, v, window):
        self.view.write(layer_idx, k, v)
        return self.attend_step(layer_idx, q, window)

    def attend_step(self, layer_idx, q, window):
        """The step's attention, its K/V already written."""
        k_blocks, v_blocks = self.view.cache.k[layer_idx], self.view.cache.v[layer_idx]
        if len(self.groups) == 1 and self.groups[0].all_valid:
            return self._attend(self.groups[0], q, k_blocks, v_blocks, window).reshape(q.shape)
        out = torch.empty_like(q)
        for group in self.groups:
            y = self._attend(group, q, k_blocks, v_blocks, window)
            out[group.query_index[group.query_valid]] = y[group.query_valid]
        return out

    @staticmethod
    def _attend(group, q, k_blocks, v_blocks, window):
        block_ids, mask = group.keys(window)
        queries = _take_rows(q, group.query_index).transpose(1, 2)         # [B, H, Q, d]
        keys = _take_rows(k_blocks, block_ids).flatten(1, 2).transpose(1, 2)  # [B, Hkv, K, d]
        values = _take_rows(v_blocks, block_ids).flatten(1, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=True)
        return y.transpose(1, 2)                                           # [B, Q, H, d]


class SdpaDecodeAttention:
    """One new token per sequence. Shapes depend only on the batch and the block
    tables' width: a windowed layer reads the fixed number of blocks its window can
    touch, starting at a block computed on the device."""

    def __init__(self, view):
        self.view = view
        self._keys = {}

    def keys(self, window: int | None):
        """(block ids [B, n], mask [B, 1, 1, n * block_size]) for this window."""
        if window not in self._keys:
            view, bs = self.view, self.view.block_size
            table_width = view.block_tables.shape[1]
            query_pos = view.context_lens.long() - 1
            if window is None:
                num_blocks, first = table_width, torch.zeros_like(query_pos)
            else:
                num_blocks = min(table_width, window // bs + 2)
                first = (query_pos - window).clamp(min=0) // bs
            offsets = torch.arange(num_blocks, device=query_pos.device)
            # reads past the table repeat its last block; their positions are masked
            block_index = (first.unsqueeze(1) + offsets).clamp(max=table_width - 1)
            key_pos = first.unsqueeze(1) * bs + torch.arange(num_blocks * bs, device=query_pos.device)
            mask = window_mask(query_pos.unsqueeze(1), key_pos, window)   # [B, 1, K]
            self._keys[window] = view.block_tables.gather(1, block_index), mask.unsqueeze(1)
        return self._keys[window]

    def __call__(self, layer_idx, q, k, v, window):
        self.view.write(layer_idx, k, v)
        block_ids, mask = self.keys(window)
        k_blocks, v_blocks = self.view.cache.k[layer_idx], self.view.cache.v[layer_idx]
        keys = _take_rows(k_blocks, block_ids).flatten(1, 2).transpose(1, 2)  # [B, Hkv, K, d]
        values = _take_rows(v_blocks, block_ids).flatten(1, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask,
                                           enable_gqa=True)                 # [B, H, 1, d]
        return y.squeeze(2)
