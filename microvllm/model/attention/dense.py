"""DenseCausalAttention: B equal-length sequences laid end to end, no cache. Used for
training and as the plain full-recompute forward the engine is tested against."""

import torch
import torch.nn.functional as F

from .base import window_mask


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
            mask = window_mask(pos, pos, window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(n, n_head, head_dim)
