"""The `cpu` attention backend on query chunks: the C kernel against the SDPA path on the
same step, side by side, and the kernel's GB/s against this machine's memory bandwidth.

    python -m benchmarks.chunk_attention [--dtype bfloat16|float32]

Each shape is one layer's attention for a step (the K/V write included, the same for
both): speculative checks (sequences of 1 + 4 query tokens at the end of their
contexts), decodes for comparison, and prefill chunks, fresh and continuing a cached
prefix. The blocks lie scattered over the pool, as a busy engine leaves them. One
thread; the two paths alternate, best of 7 rounds each, in CPU time (so other jobs on
a shared machine's cores count less). GB/s counts the keys and values the step's
queries can see, read once; the bandwidth line is a large tensor copy (read + write).
"""

import argparse
import time
from collections.abc import Callable

import torch

from microvllm.arithmetic import cdiv
from microvllm.cpu.attention import CpuPagedAttention
from microvllm.cpu.kernels import load_library
from microvllm.engine.kv_cache import PagedKVCache, SequenceKVView

# (name, sequences, query tokens each, context each)
SHAPES = (
    ("decodes", 32, 1, 100), ("checks", 32, 5, 100),
    ("decodes", 32, 1, 800), ("checks", 32, 5, 800),
    ("decodes", 32, 1, 2000), ("checks", 32, 5, 2000), ("checks", 32, 17, 2000),
    ("prefill", 4, 16, 16), ("prefill", 4, 32, 32), ("prefill", 2, 64, 64), ("prefill", 1, 128, 128),
    ("prefill", 1, 256, 256), ("prefill", 1, 900, 900),
    ("continued prefill", 4, 16, 1024), ("continued prefill", 2, 32, 1024),
    ("continued prefill", 1, 64, 1024), ("continued prefill", 1, 256, 1024),
)
N_HEAD, N_KV_HEAD, HEAD_DIM, BLOCK_SIZE = 6, 6, 64, 16
KERNEL_ONLY, SDPA_ONLY = 1 << 30, 0  # both limits of CpuPagedAttention for each path


def random_step(num_seqs: int, query_len: int, context: int, dtype: torch.dtype,
                seed: int = 0) -> tuple[SequenceKVView, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-layer cache of random K/V with each sequence's blocks scattered over it,
    the step's view, and its q, k, v."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = cdiv(context, BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    cache = PagedKVCache(1, num_blocks, BLOCK_SIZE, N_KV_HEAD, HEAD_DIM, dtype, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, blocks_per_seq)
    positions = torch.arange(context - query_len, context)
    slots = (tables[:, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE).flatten()
    view = SequenceKVView(cache, slots, tables, [query_len] * num_seqs, [context] * num_seqs)
    n = num_seqs * query_len
    q, k, v = (torch.randn(n, h, HEAD_DIM, generator=gen).to(dtype) for h in (N_HEAD, N_KV_HEAD, N_KV_HEAD))
    return view, q, k, v


def best_of(rounds: int, calls: int, paths: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Seconds per call of each path, best of `rounds`, the paths alternating."""
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, path in paths.items():
            start = time.process_time()
            for _ in range(calls):
                path()
            best[name] = min(best[name], (time.process_time() - start) / calls)
    return best


def time_shape(num_seqs: int, query_len: int, context: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds per layer of the kernel and of the SDPA path on one step of this shape."""
    view, q, k, v = random_step(num_seqs, query_len, context, dtype)
    backends = {"kernel": CpuPagedAttention(view, KERNEL_ONLY, KERNEL_ONLY),
                "sdpa": CpuPagedAttention(view, SDPA_ONLY, SDPA_ONLY)}
    pairs = num_seqs * query_len * context
    calls = max(3, int(4e6 // (pairs * N_HEAD)))
    return best_of(7, calls, {name: lambda b=b: b(0, q, k, v, None) for name, b in backends.items()})


def copy_bandwidth_gb_s(megabytes: int = 512) -> float:
    """GB/s of a large tensor copy on this thread: bytes read plus bytes written."""
    source = torch.ones(megabytes << 18)  # float32
    target = torch.empty_like(source)
    seconds = best_of(5, 1, {"copy": lambda: target.copy_(source)})["copy"]
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    if load_library() is None:
        raise SystemExit("the CPU kernels could not be built here (no C compiler?)")
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, one thread, heads {N_HEAD}/{N_KV_HEAD}, head_dim {HEAD_DIM}, "
          f"block size {BLOCK_SIZE}; memory copy: {copy_bandwidth_gb_s():.1f} GB/s")
    print("| step | kernel, us | SDPA path, us | SDPA / kernel | kernel GB/s |")
    print("|---|---|---|---|---|")
    for name, num_seqs, query_len, context in SHAPES:
        seconds = time_shape(num_seqs, query_len, context, dtype)
        kv_bytes = 2 * num_seqs * context * N_KV_HEAD * HEAD_DIM * dtype.itemsize
        print(f"| {name}: {num_seqs} x {query_len} tokens at context {context} | {seconds['kernel'] * 1e6:.0f} | "
              f"{seconds['sdpa'] * 1e6:.0f} | {seconds['sdpa'] / seconds['kernel']:.2f} | "
              f"{kv_bytes / seconds['kernel'] / 1e9:.1f} |")


if __name__ == "__main__":
    main()
