"""The flash_attn backend (CUDA): its varlen kernel reads the block table directly."""

import torch


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
