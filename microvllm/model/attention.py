"""Attention backends: how a layer's queries meet their keys.

Every backend is a callable `(layer_idx, q[N,H,d], k[N,Hkv,d], v[N,Hkv,d], window) ->
y[N,H,d]` over the flat token batch; `window` w lets query i see keys i-w..i (None =
unlimited), as nanochat's sliding windows do.

- DenseCausalAttention: B equal-length sequences laid end to end, no cache. Used for
  training and as the plain full-recompute reference the engine is tested against.
- SdpaPagedAttention: writes the step's K/V into the paged cache, then gathers each
  sequence's keys with one indexed read per layer and runs torch SDPA. Decodes and
  prefill chunks form two padded groups so a long prefill chunk does not pad every
  decode to its length.
- FlashPagedAttention: flash_attn's varlen kernel reading the block table directly.
"""

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn")


def _window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Q, K] bool: key visible to query (causal, within the window)."""
    distance = query_pos.unsqueeze(-1) - key_pos
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
    """Consecutive sequences of a step, padded to common query and key lengths."""

    def __init__(self, view, first_seq: int, last_seq: int, first_token: int):
        device = view.slot_mapping.device
        query_lens = view.query_lens[first_seq:last_seq]
        context_lens = view.context_lens[first_seq:last_seq]
        q_lens = torch.tensor(query_lens, device=device)
        c_lens = torch.tensor(context_lens, device=device)
        q_starts = first_token + torch.cumsum(q_lens, 0) - q_lens
        # padded query rows repeat the sequence's last query, so no mask row is empty
        j = torch.minimum(torch.arange(max(query_lens), device=device), (q_lens - 1).unsqueeze(1))
        self.query_valid = torch.arange(max(query_lens), device=device) < q_lens.unsqueeze(1)
        self.query_index = q_starts.unsqueeze(1) + j
        self.query_pos = (c_lens - q_lens).unsqueeze(1) + j
        self.all_valid = all(n == query_lens[0] for n in query_lens)
        self.key_pos = torch.arange(max(context_lens), device=device)
        bs = view.block_size
        blocks = view.block_tables[first_seq:last_seq, :(len(self.key_pos) + bs - 1) // bs]
        self.key_slots = (blocks.repeat_interleave(bs, dim=1)[:, :len(self.key_pos)] * bs
                          + self.key_pos % bs)
        self._masks = {}

    def mask(self, window):
        if window not in self._masks:
            self._masks[window] = _window_mask(self.query_pos, self.key_pos, window).unsqueeze(1)
        return self._masks[window]


class SdpaPagedAttention:
    def __init__(self, view):
        self.view = view
        n_dec = view.num_decode_seqs
        n_seqs = len(view.query_lens)
        self.groups = []
        if n_dec:
            self.groups.append(_PaddedGroup(view, 0, n_dec, 0))
        if n_seqs > n_dec:
            self.groups.append(_PaddedGroup(view, n_dec, n_seqs, n_dec))

    def __call__(self, layer_idx, q, k, v, window):
        self.view.write(layer_idx, k, v)
        k_pool, v_pool = self.view.cache.flat_pools(layer_idx)
        if len(self.groups) == 1 and self.groups[0].all_valid:
            return self._attend(self.groups[0], q, k_pool, v_pool, window).reshape(q.shape)
        out = torch.empty_like(q)
        for group in self.groups:
            y = self._attend(group, q, k_pool, v_pool, window)
            out[group.query_index[group.query_valid]] = y[group.query_valid]
        return out

    @staticmethod
    def _attend(group, q, k_pool, v_pool, window):
        queries = q[group.query_index].transpose(1, 2)        # [B, H, Q, d]
        keys = k_pool[group.key_slots].transpose(1, 2)         # [B, Hkv, K, d]
        values = v_pool[group.key_slots].transpose(1, 2)
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask(window),
                                           enable_gqa=True)
        return y.transpose(1, 2)                               # [B, Q, H, d]


class FlashPagedAttention:
    """flash_attn >= 2.6 varlen attention over the paged cache (block_size % 256 == 0)."""

    def __init__(self, view):
        from flash_attn import flash_attn_varlen_func
        self.kernel = flash_attn_varlen_func
        self.view = view
        device = view.slot_mapping.device
        self.cu_seqlens_q = _cumulative(view.query_lens, device)
        self.cu_seqlens_k = _cumulative(view.context_lens, device)
        self.block_table = view.block_tables.to(torch.int32)

    def __call__(self, layer_idx, q, k, v, window):
        self.view.write(layer_idx, k, v)
        view = self.view
        return self.kernel(
            q, view.cache.k[layer_idx], view.cache.v[layer_idx],
            cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=view.max_query_len, max_seqlen_k=view.max_context_len,
            causal=True, window_size=(-1 if window is None else window, 0),
            block_table=self.block_table)


def _cumulative(lengths: list[int], device) -> torch.Tensor:
    counts = torch.tensor([0] + lengths, dtype=torch.int32, device=device)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str, device: torch.device):
    """The backend class for `attention_backend=name` on `device`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
    use_flash = name == "flash_attn" or (
        name == "auto" and device.type == "cuda" and flash_attn_available())
    if use_flash and (device.type != "cuda" or not flash_attn_available()):
        raise ValueError("attention_backend='flash_attn' needs a CUDA device and the "
                         "flash_attn package; use 'sdpa' or 'auto'")
    return FlashPagedAttention if use_flash else SdpaPagedAttention
