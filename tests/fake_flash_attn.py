"""Test double for the `flash_attn` package: its paged-KV attention on CPU in plain PyTorch.

flash_attn runs only on CUDA. This module stands in for it (the `fake_flash_attn_installed`
fixture in conftest.py installs it as `flash_attn`) so the tests can check the
FlashAttention backend on any machine. It covers the calls microvllm makes and no more:
`flash_attn_varlen_func` and `flash_attn_with_kvcache` over a paged cache, without
dropout, softcap, ALiBi, rotary or appending new keys; any other argument is a TypeError.
Clarity over speed: one loop over sequences, math in float32, the result in the dtype of q.

The semantics follow flash_attn 2.x's docstrings (flash_attn/flash_attn_interface.py):
- GQA/MQA: the query heads split into as many consecutive groups as there are KV
  heads; group g reads KV head g.
- A sequence's seqlen_q queries are its last ones: query i sits at key position
  i + seqlen_k - seqlen_q. The causal mask is aligned to that bottom-right corner.
- window_size=(left, right) lets that query see keys from its position - left to its
  position + right, inclusive; -1 is unlimited, and causal makes right 0.
- A query that sees no key outputs zeros.
- softmax_scale defaults to 1 / sqrt(head_dim).
- Paged KV: the caches are [num_blocks, page_block_size, n_kv_head, head_dim], and key
  j of sequence b sits in block block_table[b, j // page_block_size], row
  j % page_block_size. Only the lengths count: cu_seqlens_k[b + 1] - cu_seqlens_k[b]
  keys (varlen), cache_seqlens[b] keys (with_kvcache, which here appends nothing).

Each call first checks its inputs as the real one does (the TORCH_CHECKs of
mha_varlen_fwd and mha_fwd_kvcache in csrc/flash_attn/flash_api.cpp), raising
RuntimeError like them, so a call that would fail on a GPU fails here too. It also
checks what the kernel trusts unchecked: that cu_seqlens_q and the max_seqlen arguments
describe the batch.
"""

import torch

PAGE_BLOCK_MULTIPLE = 256
MAX_HEAD_DIM = 256


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           block_table, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """q [total_q, H, d] of consecutive sequences -> out [total_q, H, d]."""
    _require(q.dim() == 3, "q must be [total_q, n_head, head_dim]")
    batch_size = cu_seqlens_q.shape[0] - 1
    _check_paged_call(q, k, v, block_table, batch_size)
    _check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch_size + 1, q.device)
    _check_int32_vector(cu_seqlens_k, "cu_seqlens_k", batch_size + 1, q.device)
    query_lens, key_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    # not checked by the kernel, but its launch grid and window clamp are sized by them
    _require(int(cu_seqlens_q[-1]) == q.shape[0], "cu_seqlens_q must end at total_q")
    _require(max_seqlen_q >= max(query_lens), "max_seqlen_q is below a query length")
    _require(max_seqlen_k >= max(key_lens), "max_seqlen_k is below a key length")
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for b, (start, end) in enumerate(zip(starts, starts[1:])):
        keys = _paged_rows(k, block_table[b], key_lens[b])
        values = _paged_rows(v, block_table[b], key_lens[b])
        out[start:end] = _attend(q[start:end], keys, values, softmax_scale, causal, window_size)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale=None,
                            causal=False, window_size=(-1, -1)):
    """q [B, seqlen_q, H, d] over keys already in the cache -> out [B, seqlen_q, H, d]."""
    _require(q.dim() == 4, "q must be [batch_size, seqlen_q, n_head, head_dim]")
    batch_size = q.shape[0]
    _check_paged_call(q, k_cache, v_cache, block_table, batch_size)
    _check_int32_vector(cache_seqlens, "cache_seqlens", batch_size, q.device)
    out = torch.empty_like(q)
    for b, num_keys in enumerate(cache_seqlens.tolist()):
        keys = _paged_rows(k_cache, block_table[b], num_keys)
        values = _paged_rows(v_cache, block_table[b], num_keys)
        out[b] = _attend(q[b], keys, values, softmax_scale, causal, window_size)
    return out


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _check_paged_call(q, k_cache, v_cache, block_table, batch_size: int) -> None:
    _require(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16")
    _require(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "q, k and v must share a dtype")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)):
        _require(x.device == q.device, f"{name} must be on the device of q")
        _require(x.stride(-1) == 1, f"{name} must have contiguous last dimension")
    _require(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
             "paged k_cache and v_cache must both be [num_blocks, page_block_size, n_kv_head, head_dim]")
    _require(k_cache.shape[1] % PAGE_BLOCK_MULTIPLE == 0,
             f"paged KV cache block size must be divisible by {PAGE_BLOCK_MULTIPLE}")
    _require(q.shape[-1] == k_cache.shape[-1] <= MAX_HEAD_DIM,
             f"q and the caches must share one head_dim of at most {MAX_HEAD_DIM}")
    _require(q.shape[-2] % k_cache.shape[2] == 0, "n_kv_head must divide n_head")
    _require(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
    _require(block_table.dim() == 2 and block_table.shape[0] == batch_size,
             "block_table must be [batch_size, max_num_blocks_per_seq]")


def _check_int32_vector(x, name: str, length: int, device) -> None:
    _require(x.dtype == torch.int32, f"{name} must have dtype int32")
    _require(x.device == device, f"{name} must be on the device of q")
    _require(x.is_contiguous(), f"{name} must be contiguous")
    _require(x.shape == (length,), f"{name} must have shape ({length},)")


def _paged_rows(cache, block_row, num_keys: int):
    """The first num_keys keys (or values) of one sequence, [num_keys, n_kv_head, d]."""
    page_block_size = cache.shape[1]
    positions = torch.arange(num_keys, device=cache.device)
    blocks = block_row[positions // page_block_size].long()
    return cache[blocks, positions % page_block_size]


def _attend(q, keys, values, softmax_scale, causal, window_size):
    """One sequence: q [seqlen_q, H, d], keys/values [seqlen_k, Hkv, d] -> [seqlen_q, H, d]."""
    seqlen_q, n_head, head_dim = q.shape
    seqlen_k, n_kv_head, _ = keys.shape
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    group = n_head // n_kv_head
    keys, values = (x.float().repeat_interleave(group, dim=1) for x in (keys, values))
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale

    query_pos = torch.arange(seqlen_q, device=q.device).unsqueeze(1) + seqlen_k - seqlen_q
    offset = torch.arange(seqlen_k, device=q.device).unsqueeze(0) - query_pos  # key minus query
    left, right = window_size
    right = 0 if causal else right
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right

    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    weights = torch.where(visible.any(dim=-1, keepdim=True), weights, 0.0)  # no key: NaN -> 0
    return torch.einsum("hqk,khd->qhd", weights, values).to(q.dtype)
