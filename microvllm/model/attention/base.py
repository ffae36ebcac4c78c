"""What every attention backend shares: the call contract, the window rule, and the
AttentionBackend record the platform picks (platform/).

Every backend is a callable `(layer_idx, q[N,H,d], k[N,Hkv,d], v[N,Hkv,d], window) ->
y[N,H,d]` over the flat token batch; `window` w lets query i see keys i-w..i (None =
unlimited), as nanochat's sliding windows do. Each paged backend has a decode twin over
a DecodeKVView (fixed shapes, lengths only on the device, no host syncs) that a CUDA
graph can capture; AttentionBackend pairs them.
"""

from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("auto", "sdpa", "cpu", "flash_attn", "triton")
# small blocks waste little memory at the end of each sequence and share prefixes
# finely; flash_attn takes only multiples of 256
DEFAULT_BLOCK_SIZE = 16


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Q, K] bool: key visible to query (causal, within the window)."""
    distance = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)
    visible = distance >= 0
    return visible if window is None else visible & (distance <= window)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    step: type              # over a SequenceKVView: any mix of prefill chunks and decodes
    decode: type            # over a DecodeKVView: capturable in a CUDA graph
    block_size_multiple: int = 1  # block_size must be a multiple of this (and a power of two)
    # the step backend computes every row of a chunk of up to this many query tokens bit
    # for bit as a decode of the row's position, so a token and its speculative guesses
    # can be checked as one chunk; longer ones the runner splits into single queries
    exact_chunk_rows: int = 1

    @property
    def default_block_size(self) -> int:
        return max(DEFAULT_BLOCK_SIZE, self.block_size_multiple)


