"""How many KV blocks the engine gets, and a line describing the memory they take.

In order of precedence: `num_blocks`; `kv_cache_memory` bytes; on CUDA (a platform
that sizes the KV cache by free memory), what
`gpu_memory_utilization` of the card leaves once the weights, everything else already
on the card (the CUDA context, other processes), the peak of the costliest eager step
(the largest forward, then the sampler with every option on max_num_seqs rows and a
chunk of prompt log-probs) and the CUDA graphs' private pool (the largest decode
batch's forward) are counted; on CPU, room for max_num_seqs full-length sequences, at most
a share of the RAM available.
A byte budget buys at most PREFIX_CACHE_HEADROOM times what max_num_seqs full-length
sequences can fill. CPU sizing is cpu_kv_blocks'.
"""

import logging
import os
from pathlib import Path

import torch

from ..arithmetic import cdiv
from ..model.attention import DenseCausalAttention
from ..model.gpt import GPT
from ..platform import Platform, cuda
from ..sampling_params import MAX_LOGPROBS, SamplingParams
from .config import CPU_KV_CACHE_RAM_FRACTION, EngineConfig
from .kv_cache import DecodeKVView, PagedKVCache
from .logprobs import PROMPT_LOGPROBS_CHUNK, logprob_table
from .sampler import Sampler
from .sequence import Request, Sequence

GIB = 1024**3
# a memory budget buys at most this many times the blocks that max_num_seqs full-length
# sequences fill: the rest keeps freed prefixes cached for later hits
PREFIX_CACHE_HEADROOM = 2

logger = logging.getLogger(__name__)


def num_kv_blocks(config: EngineConfig, model: GPT, platform: Platform, dtype: torch.dtype,
                  max_model_len: int, block_size: int, decode_attention: type | None = None) -> int:
    """`decode_attention` is the decode twin when decode steps will replay CUDA graphs."""
    mc, device = model.config, platform.device
    per_block = PagedKVCache.bytes_per_block(mc.n_layer, block_size, mc.n_kv_head, mc.head_dim, dtype)
    if config.num_blocks is not None or config.kv_cache_memory is not None:
        asked = config.num_blocks or max(config.kv_cache_memory // per_block, 1)
        # refused here rather than by an allocator that may kill the process later
        if asked * per_block > platform.memory_bytes():
            raise ValueError(f"a KV cache of {asked} blocks takes {asked * per_block / GIB:.1f} "
                             f"GiB, more than the {platform.memory_bytes() / GIB:.1f} GiB of memory "
                             f"on {device}: lower num_blocks or kv_cache_memory")
    if config.num_blocks is not None:
        return config.num_blocks
    blocks_for_all_seqs = config.max_num_seqs * cdiv(max_model_len, block_size)
    if config.kv_cache_memory is None and not platform.sizes_kv_cache_by_free_memory:
        return cpu_kv_blocks(config.max_num_seqs, max_model_len, block_size, per_block)
    budget = (config.kv_cache_memory if config.kv_cache_memory is not None
              else gpu_bytes_for_kv_cache(config, model, device, max_model_len, decode_attention, block_size))
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
def gpu_bytes_for_kv_cache(config: EngineConfig, model: GPT, device: torch.device, max_model_len: int,
                           decode_attention: type | None = None, block_size: int = 16) -> int:
    """What gpu_memory_utilization of the card leaves for the KV cache, once the memory
    already in use, the peak of the costliest eager step and, when decode steps replay
    CUDA graphs (`decode_attention` given), the graphs' private pool are counted."""
    free, total = cuda.free_memory(device)
    activations = cuda.peak_bytes(device, lambda: _costliest_step(config, model, device, max_model_len))
    graph_pool = 0
    if decode_attention is not None:
        # the largest graph's forward, run eagerly over a cache of one sequence, made first
        # the embedding's dtype is the activations': a linear may be packed or quantized
        view = _largest_decode_view(config, model, device, model.transformer.wte.weight.dtype, max_model_len,
                                    block_size)
        ids = torch.zeros(config.max_num_seqs, dtype=torch.long, device=device)
        graph_pool = cuda.peak_bytes(device, lambda: model(ids, ids + max_model_len - 1, ids, decode_attention(view)))
        del view
    cuda.free_memory(device)  # the profiled runs' blocks go back to the card, for the KV cache
    return int(total * config.gpu_memory_utilization - (total - free) - activations - graph_pool)


def _costliest_step(config: EngineConfig, model: GPT, device: torch.device, max_model_len: int) -> None:
    """One forward of max_num_batched_tokens tokens (as sequences of at most max_model_len),
    then, beside its hidden states, the sampler at its costliest on max_num_seqs rows and
    one chunk of prompt log-probs."""
    seq_len = min(config.max_num_batched_tokens, max_model_len)
    num_seqs = cdiv(config.max_num_batched_tokens, seq_len)
    ids = torch.zeros(num_seqs * seq_len, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    hidden = model(ids, positions, ids - 1, DenseCausalAttention(num_seqs))
    rows = hidden[:1].expand(config.max_num_seqs, -1)
    Sampler(frozenset({0}))(model.compute_logits(rows),
                            _costliest_sequences(config.max_num_seqs, max_model_len, model.config.vocab_size))
    chunk = hidden[:1].expand(PROMPT_LOGPROBS_CHUNK, -1)
    logprob_table(model.compute_logits(chunk), ids[:1].expand(PROMPT_LOGPROBS_CHUNK), MAX_LOGPROBS)


def _costliest_sequences(num_seqs: int, max_model_len: int, vocab_size: int) -> list[Sequence]:
    # every feature that costs sampler memory: penalties, blocked EOS, all three filters
    # (a top_k near the vocabulary sorts it whole), and the most log-probs
    params = SamplingParams(temperature=1.0, top_k=vocab_size - 1, top_p=0.9, min_p=0.01, min_tokens=1,
                            repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1,
                            logprobs=MAX_LOGPROBS, max_tokens=None)
    prompt = [0] * (max_model_len - 1)
    request = Request("memory-profile", None, prompt, params)
    return [Sequence(i, request, i, list(prompt), seed=i) for i in range(num_seqs)]


def _largest_decode_view(config: EngineConfig, model: GPT, device: torch.device, dtype: torch.dtype,
                         max_model_len: int, block_size: int) -> DecodeKVView:
    """The largest captured graph's batch: max_num_seqs decodes at max_model_len, all
    reading the blocks of one sequence."""
    mc, n = model.config, config.max_num_seqs
    width = cdiv(max_model_len, block_size)
    cache = PagedKVCache(mc.n_layer, width, block_size, mc.n_kv_head, mc.head_dim, dtype, device)
    return DecodeKVView(cache, torch.full((n,), cache.padding_block * block_size, device=device),
                        torch.arange(width, device=device).repeat(n, 1),
                        torch.full((n,), max_model_len, device=device))


def describe_kv_cache(kv_cache: PagedKVCache, platform: Platform) -> str:
    kv_bytes = kv_cache.k.nbytes + kv_cache.v.nbytes
    return (f"KV cache: {kv_cache.num_blocks} blocks of {kv_cache.block_size} tokens "
            f"({kv_cache.num_blocks * kv_cache.block_size} tokens, {kv_bytes / GIB:.2f} GiB)"
            + platform.describe_memory())


def cpu_kv_blocks(max_num_seqs: int, max_model_len: int, block_size: int, bytes_per_block: int) -> int:
    """Room for max_num_seqs full-length sequences, all the scheduler can ever hold (so
    nothing is preempted), but at most CPU_KV_CACHE_RAM_FRACTION of the RAM available now,
    with the weights loaded; never less than one full-length sequence.

    The pool is reserved, not committed: a block takes RAM from its first write on, and
    the CPU block manager reuses freed blocks before untouched ones, so a run commits what
    its busiest moment holds. The share is of what is available, not of all RAM: engines
    built one after another each see what the ones before them left."""
    blocks_per_seq = cdiv(max_model_len, block_size)
    wanted = max_num_seqs * blocks_per_seq
    available = available_ram()
    affordable = int(available * CPU_KV_CACHE_RAM_FRACTION) // bytes_per_block
    if wanted <= affordable:
        logger.info(f"KV cache: room for max_num_seqs={max_num_seqs} sequences of max_model_len={max_model_len}")
        return wanted
    num_blocks = max(affordable, blocks_per_seq)
    logger.info(f"KV cache: {CPU_KV_CACHE_RAM_FRACTION:.0%} of the {available / GIB:.1f} GiB of RAM available, "
                f"{num_blocks / wanted:.0%} of what max_num_seqs={max_num_seqs} sequences of max_model_len="
                f"{max_model_len} can fill (kv_cache_memory or num_blocks set it)")
    return num_blocks


def available_ram() -> int:
    """Bytes of RAM the kernel could hand out now (MemAvailable, else its free pages),
    within the cgroup v2 memory limit of this process, where there is one."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory limit visible
    return max(available, 0)
