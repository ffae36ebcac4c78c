"""How many KV blocks the engine gets, and a line describing the memory they take.

In order of precedence: `num_blocks`; `kv_cache_memory` bytes; on CUDA, what
`gpu_memory_utilization` of the card leaves once the weights, everything else already
on the card (the CUDA context, other processes) and the peak activations of the
largest step are counted; on CPU, room for max_num_seqs full-length sequences, capped
(see cpu_kv_blocks).
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
    if config.num_blocks is not None:
        return config.num_blocks
    mc = model.config
    per_block = PagedKVCache.bytes_per_block(mc.n_layer, block_size, mc.n_kv_head, mc.head_dim, dtype)
    if config.kv_cache_memory is not None:
        return max(int(config.kv_cache_memory // per_block), 1)
    if device.type == "cuda":
        return max(gpu_bytes_for_kv_cache(config, model, device, max_model_len) // per_block, 1)
    return cpu_kv_blocks(config.max_num_seqs, max_model_len, block_size, per_block)


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


def cpu_kv_blocks(max_num_seqs: int, max_model_len: int, block_size: int, bytes_per_block: int) -> int:
    """Room for max_num_seqs full-length sequences, all the scheduler can ever hold (so
    nothing is preempted), but at most MAX_DEFAULT_CPU_KV_CACHE_MEMORY and a quarter of
    the RAM available now: the cache is zero-filled, so all of it is resident from the
    start. Never less than one full-length sequence."""
    blocks_per_seq = -(-max_model_len // block_size)
    cap = min(MAX_DEFAULT_CPU_KV_CACHE_MEMORY, available_ram() // 4) // bytes_per_block
    return min(max_num_seqs * blocks_per_seq, max(cap, blocks_per_seq))


def available_ram() -> int:
    """Bytes of RAM the kernel could hand out now (MemAvailable), else its free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
