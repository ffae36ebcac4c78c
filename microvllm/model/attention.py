"""Attention backends: how a layer's queries meet their keys.

Every backend is a callable `(layer_idx, q[N,H,d], k[N,Hkv,d], v[N,Hkv,d], window) ->
y[N,H,d]` over the flat token batch; `window` w lets query i see keys i-w..i (None =
unlimited), as nanochat's sliding windows do.

- DenseCausalAttention: B equal-length sequences laid end to end, no cache. Used for
  training and as the plain full-recompute reference the engine is tested against.
- SdpaPagedAttention: writes the step's K/V into the paged cache, then gathers each
  sequence's key blocks with one indexed read per layer and group, and runs torch
  SDPA. Sequences come sorted (decodes first, then by context length) and are cut into
  a few padded groups of similar lengths, so a long prefill chunk or context does not
  pad every other sequence to its size.
- CpuPagedAttention (cpu_attention.py): on CPU, decodes read the cache in place
  through a small C kernel built on first use; prefill chunks go through SDPA. The
  same C library fuses the forward's norms and rotary (cpu_ops.py).
- FlashPagedAttention: flash_attn's varlen kernel reading the block table directly.
- TritonPagedAttention (triton_attention.py): our own Triton kernel over the block
  table, any power-of-two block_size; imported only when chosen.

Each of the paged ones has a decode twin over a DecodeKVView (fixed shapes, lengths
only on the device, no host syncs) that a CUDA graph can capture; AttentionBackend
pairs them.
"""

import importlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "cpu", "flash_attn", "triton")
# small blocks waste little memory at the end of each sequence and share prefixes
# finely; flash_attn takes only multiples of 256
DEFAULT_BLOCK_SIZE = 16


def _window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Q, K] bool: key visible to query (causal, within the window)."""
    distance = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)
    visible = distance >= 0
    return visible if window is None else visible & (distance <= window)


class DenseCausalAttention:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, layer_idx, q, k, v, window):
        n, n_head, head_dim = q.shape
        b, t = self.batch_size, n // self.batch_size
        q, k, v = (x.view(b, t, -1, head_dim).transpose(1, 2) for x in (q, k, v))
        if window is None or window >= t - 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            pos = torch.arange(t, device=q.device)
            mask = _window_mask(pos, pos, window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(n, n_head, head_dim)


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
            num_blocks = max(-(-ctx // bs) - first for ctx, first in zip(self.context_lens, first_blocks))
            first = torch.tensor(first_blocks, device=device).unsqueeze(1)
            block_index = (first + torch.arange(num_blocks, device=device)).clamp(
                max=self.block_tables.shape[1] - 1)
            key_pos = first * bs + torch.arange(num_blocks * bs, device=device)
            plain_causal = not any(self.first_query_pos) and (
                window is None or window >= max(self.context_lens) - 1)
            mask = None if plain_causal else _window_mask(self.query_pos, key_pos, window).unsqueeze(1)
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

    def __init__(self, view, first_seq: int = 0):
        """Groups the sequences from `first_seq` on (those before are another backend's)."""
        self.view = view
        self.groups = []
        self.covers_step = first_seq == 0
        query_lens, context_lens = view.query_lens, view.context_lens
        first_token = sum(query_lens[:first_seq])
        for i in range(first_seq + 1, len(query_lens) + 1):
            if i < len(query_lens) and (query_lens[i] == 1) == (query_lens[first_seq] == 1) and \
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
        if self.covers_step and len(self.groups) == 1 and self.groups[0].all_valid:
            k_blocks, v_blocks = self.view.cache.k[layer_idx], self.view.cache.v[layer_idx]
            return self._attend(self.groups[0], q, k_blocks, v_blocks, window).reshape(q.shape)
        return self.attend(layer_idx, q, window, torch.empty_like(q))

    def attend(self, layer_idx, q, window, out):
        """Fill the grouped sequences' rows of `out` (the step's K/V already written)."""
        k_blocks, v_blocks = self.view.cache.k[layer_idx], self.view.cache.v[layer_idx]
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
            mask = _window_mask(query_pos.unsqueeze(1), key_pos, window)   # [B, 1, K]
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


class FlashPagedAttention:
    """flash_attn >= 2.6 varlen attention over the paged cache (block_size % 256 == 0)."""

    def __init__(self, view):
        from flash_attn import flash_attn_varlen_func
        self.kernel = flash_attn_varlen_func
        self.view = view
        self.cu_seqlens_q = view.cu_query_lens.to(torch.int32)
        self.cu_seqlens_k = view.cu_context_lens.to(torch.int32)
        self.block_table = view.block_tables.to(torch.int32)

    def __call__(self, layer_idx, q, k, v, window):
        self.view.write(layer_idx, k, v)
        view = self.view
        return self.kernel(
            q, view.cache.k[layer_idx], view.cache.v[layer_idx],
            cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=view.max_query_len, max_seqlen_k=view.max_context_len,
            causal=True, window_size=_flash_window(window), block_table=self.block_table)


class FlashDecodeAttention:
    """flash_attn's KV-cache kernel for one new token per sequence (already written)."""

    def __init__(self, view):
        from flash_attn import flash_attn_with_kvcache
        self.kernel = flash_attn_with_kvcache
        self.view = view
        self.cache_seqlens = view.context_lens.to(torch.int32)
        self.block_table = view.block_tables.to(torch.int32)

    def __call__(self, layer_idx, q, k, v, window):
        self.view.write(layer_idx, k, v)
        cache = self.view.cache
        y = self.kernel(q.unsqueeze(1), cache.k[layer_idx], cache.v[layer_idx],
                        cache_seqlens=self.cache_seqlens, block_table=self.block_table,
                        causal=True, window_size=_flash_window(window))
        return y.squeeze(1)


def _flash_window(window: int | None) -> tuple[int, int]:
    # (-1, -1) without a window: for one query per sequence flash_attn drops causal, and
    # a right bound of 0 would then send it down its slower sliding-window path
    return (-1, -1) if window is None else (window, 0)


def _cpu_kernel(dtype: torch.dtype) -> bool:
    from .cpu_kernels import available
    return available(dtype)


def _importable(module: str) -> bool:
    # an import, not a spec lookup: a wheel built for another torch or CUDA fails here
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    step: type              # over a SequenceKVView: any mix of prefill chunks and decodes
    decode: type            # over a DecodeKVView: capturable in a CUDA graph
    block_size_multiple: int = 1  # block_size must be a multiple of this (and a power of two)
    # the forward's norms and rotary, where the backend brings its own kernels for them
    # (gpt.TorchOps otherwise)
    model_ops: type | None = None

    @property
    def default_block_size(self) -> int:
        return max(DEFAULT_BLOCK_SIZE, self.block_size_multiple)


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The backend that `attention_backend=name` means on `device` for a `dtype` cache."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
    on_cuda = device.type == "cuda"
    flash_dtype = dtype in (torch.float16, torch.bfloat16)  # flash_attn computes in nothing else
    if name == "auto":
        name = ("flash_attn" if on_cuda and flash_dtype and _importable("flash_attn") else
                "triton" if on_cuda and _importable("triton") else
                "cpu" if device.type == "cpu" and _cpu_kernel(dtype) else "sdpa")
    if name == "cpu":
        if device.type != "cpu" or not _cpu_kernel(dtype):
            raise ValueError("attention_backend='cpu' needs device='cpu', dtype 'float32' or 'bfloat16', "
                             "and a C compiler (cc, or $CC) to build its kernel; use 'sdpa' or 'auto'")
        from .cpu_attention import CpuPagedAttention
        from .cpu_ops import CpuOps
        return AttentionBackend(name, CpuPagedAttention, SdpaDecodeAttention, model_ops=CpuOps)
    if name == "flash_attn":
        if not on_cuda or not _importable("flash_attn"):
            raise ValueError("attention_backend='flash_attn' needs a CUDA device and the "
                             "flash_attn package; use 'sdpa' or 'auto'")
        if not flash_dtype:
            raise ValueError(f"attention_backend='flash_attn' needs dtype float16 or bfloat16, "
                             f"got {dtype}; use 'triton', 'sdpa' or 'auto'")
        # flash_attn reads a paged cache only in pages of a multiple of 256 tokens
        return AttentionBackend(name, FlashPagedAttention, FlashDecodeAttention, block_size_multiple=256)
    if name == "triton":
        # on CPU tensors Triton kernels run only in its (slow) interpreter, meant for tests
        if not _importable("triton") or not (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("attention_backend='triton' needs the triton package and a CUDA "
                             "device (or TRITON_INTERPRET=1 on CPU); use 'sdpa' or 'auto'")
        from .triton_attention import TritonDecodeAttention, TritonPagedAttention
        return AttentionBackend(name, TritonPagedAttention, TritonDecodeAttention)
    return AttentionBackend(name, SdpaPagedAttention, SdpaDecodeAttention)
