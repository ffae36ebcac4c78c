"""How many KV blocks the engine gets, and a line describing the memory they take.

In order of precedence: `num_blocks`; `kv_cache_memory` bytes; on CUDA, what
`gpu_memory_utilization` of the card leaves once the weights, everything else already
on the card (the CUDA context, other processes) and the peak activations of the
largest step are counted; on CPU, room for max_num_seqs full-length sequences, capped.
"""

import os

import torch

from ..model.attention import DenseCausalAttention
from ..model.gpt import GPT
from .config import MAX_DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from .kv_cache import PagedKVCache

GIB = 1024**3


def num_kv_blocks(config: EngineConfig, model: GPT, device: torch.device, dtype: torch.dtype,
                  max_model_len: int, block_size: int) -> int:
    mc = model.config
    per_block = PagedKVCache.bytes_per_block(mc.n_layer, block_size, mc.n_kv_head, mc.head_dim, dtype)
    if config.num_blocks is not None or config.kv_cache_memory is not None:
        num_blocks = config.num_blocks or max(config.kv_cache_memory // per_block, 1)
        # refused here rather than by an allocator that may kill the process later
        if num_blocks * per_block > device_memory_bytes(device):
            raise ValueError(f"a KV cache of {num_blocks} blocks takes {num_blocks * per_block / GIB:.1f} "
                             f"GiB, more than the {device_memory_bytes(device) / GIB:.1f} GiB of memory "
                             f"on {device}: lower num_blocks or kv_cache_memory")
        return num_blocks
    if device.type == "cuda":
        return max(gpu_bytes_for_kv_cache(config, model, device, max_model_len) // per_block, 1)
    blocks_for_all_seqs = config.max_num_seqs * -(-max_model_len // block_size)
    return min(blocks_for_all_seqs, MAX_DEFAULT_CPU_KV_CACHE_MEMORY // per_block)


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@torch.inference_mode()
def gpu_bytes_for_kv_cache(config: EngineConfig, model: GPT, device: torch.device,
                            max_model_len: int) -> int:
    """Runs one forward of max_num_batched_tokens tokens (as sequences of at most
    max_model_len) plus the logits of max_num_seqs rows, and measures its peak."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    seq_len = min(config.max_num_batched_tokens, max_model_len)
    num_seqs = -(-config.max_num_batched_tokens // seq_len)
    ids = torch.zeros(num_seqs * seq_len, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    hidden = model(ids, positions, ids - 1, DenseCausalAttention(num_seqs))
    # the sampler holds a few logits-sized tensors at once: softmax stands for them
    model.compute_logits(hidden[:config.max_num_seqs]).softmax(-1)
    activations = torch.cuda.max_memory_allocated(device) - allocated_before
    del hidden
    torch.cuda.empty_cache()
    return int(total * config.gpu_memory_utilization - (total - free) - activations)


def describe_kv_cache(kv_cache: PagedKVCache, device: torch.device) -> str:
    kv_bytes = kv_cache.k.nbytes + kv_cache.v.nbytes
    line = (f"KV cache: {kv_cache.num_blocks} blocks of {kv_cache.block_size} tokens "
            f"({kv_cache.num_blocks * kv_cache.block_size} tokens, {kv_bytes / GIB:.2f} GiB)")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        line += f"; GPU memory in use: {(total - free) / GIB:.1f} of {total / GIB:.1f} GiB ({1 - free / total:.0%})"
    return line
