"""How many KV blocks the engine gets, and a line describing the memory they take.

In order of precedence: `num_blocks`; `kv_cache_memory` bytes; on CUDA, what
`gpu_memory_utilization` of the card leaves once the weights, everything else already
on the card (the CUDA context, other processes) and the peak activations of the
largest step are counted; on CPU, room for max_num_seqs full-length sequences, capped.
A byte budget buys at most PREFIX_CACHE_HEADROOM times what max_num_seqs full-length
sequences can fill.
"""

import logging

import torch

from ..model.attention import DenseCausalAttention
from ..model.gpt import GPT
from .config import MAX_DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from .kv_cache import PagedKVCache

GIB = 1024**3
# a memory budget buys at most this many times the blocks that max_num_seqs full-length
# sequences fill: the rest keeps freed prefixes cached for later hits
PREFIX_CACHE_HEADROOM = 2

logger = logging.getLogger(__name__)


def num_kv_blocks(config: EngineConfig, model: GPT, device: torch.device, dtype: torch.dtype,
                  max_model_len: int, block_size: int) -> int:
    if config.num_blocks is not None:
        return config.num_blocks
    mc = model.config
    per_block = PagedKVCache.bytes_per_block(mc.n_layer, block_size, mc.n_kv_head, mc.head_dim, dtype)
    blocks_for_all_seqs = config.max_num_seqs * -(-max_model_len // block_size)
    if config.kv_cache_memory is None and device.type != "cuda":
        return min(blocks_for_all_seqs, MAX_DEFAULT_CPU_KV_CACHE_MEMORY // per_block)
    budget = (config.kv_cache_memory if config.kv_cache_memory is not None
              else gpu_bytes_for_kv_cache(config, model, device, max_model_len))
    num_blocks = max(int(budget // per_block), 1)
    # a small model on a large card would otherwise get tens of millions of blocks, each
    # a Python object in the BlockManager: minutes of start-up and gigabytes of host RAM
    cap = PREFIX_CACHE_HEADROOM * blocks_for_all_seqs
    if num_blocks > cap:
        logger.info(f"KV cache capped at {cap} blocks ({PREFIX_CACHE_HEADROOM}x what max_num_seqs="
                    f"{config.max_num_seqs} sequences of max_model_len={max_model_len} can use) "
                    f"instead of the {num_blocks} the memory budget allows")
        num_blocks = cap
    return num_blocks


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
