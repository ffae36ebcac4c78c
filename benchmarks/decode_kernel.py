"""The CPU attention kernel alone, on decodes: nanoseconds per (key, query head) and GB/s of
keys and values read, on a few batch shapes, bfloat16 and float32.

    python -m benchmarks.decode_kernel

Each shape is a batch of decoding sequences with contexts drawn uniformly from half to
all of the given length, their blocks scattered at random over a pool with room for them
all (as a busy engine leaves them). Small contexts fit in the CPU's caches and show the
kernel's arithmetic; long ones show how close it gets to memory bandwidth. Best of 7
timings of one thread.
"""

import argparse
import time

import numpy as np
import torch

from microvllm.cpu.attention import work_items
from microvllm.cpu.kernels import load_library

# (sequences, context, query heads, kv heads, head_dim)
SHAPES = ((32, 100, 6, 6, 64), (128, 100, 6, 6, 64), (32, 800, 6, 6, 64), (64, 300, 12, 12, 64),
          (64, 300, 16, 4, 128))
BLOCK_SIZE = 16


def time_kernel(shape: tuple, dtype: torch.dtype) -> tuple[float, float]:
    """(ns per key and query head, GB/s of keys and values) of one call on this shape."""
    num_seqs, context, n_head, n_kv_head, head_dim = shape
    generator = torch.Generator().manual_seed(0)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq + 1
    k, v = (torch.randn(num_blocks, BLOCK_SIZE, n_kv_head, head_dim, generator=generator).to(dtype)
            for _ in range(2))
    tables = torch.randperm(num_blocks, generator=generator)[:num_seqs * blocks_per_seq]
    tables = tables.view(num_seqs, blocks_per_seq).contiguous()
    context_lens = torch.randint(context // 2, context + 1, (num_seqs,), generator=generator)
    q = torch.randn(num_seqs, n_head, head_dim, generator=generator).to(dtype)
    out = torch.empty_like(q)
    rows = torch.arange(num_seqs)
    items = torch.from_numpy(work_items(rows.numpy(), np.ones(num_seqs, np.int64), context_lens.numpy(), rows.numpy()))
    kernel = load_library().paged_attention
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), items.data_ptr(), out.data_ptr(),
            0, len(items), blocks_per_seq, n_head, n_kv_head, head_dim, BLOCK_SIZE, -1, head_dim ** -0.5,
            int(dtype == torch.bfloat16))
    keys = int(context_lens.sum())
    calls = max(10, int(2e6 // (keys * n_head)))
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            kernel(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e9 / (keys * n_head), 2 * keys * n_kv_head * head_dim * k.element_size() / best / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    if load_library() is None:
        raise SystemExit("the CPU kernels could not be built here (no C compiler?)")
    torch.set_num_threads(1)
    print("| sequences x context, heads q/kv, head_dim | bf16 ns per key-head | bf16 GB/s | fp32 ns | fp32 GB/s |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        (bf16_ns, bf16_gb_s), (fp32_ns, fp32_gb_s) = (time_kernel(shape, d) for d in (torch.bfloat16, torch.float32))
        num_seqs, context, n_head, n_kv_head, head_dim = shape
        print(f"| {num_seqs} x {context}, {n_head}/{n_kv_head}, {head_dim} | {bf16_ns:.1f} | {bf16_gb_s:.1f} | "
              f"{fp32_ns:.1f} | {fp32_gb_s:.1f} |")


if __name__ == "__main__":
    main()
