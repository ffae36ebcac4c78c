"""Random steps over a paged KV cache, for holding an attention backend against SDPA."""

import torch

from microvllm.engine.kv_cache import DecodeKVView, PagedKVCache, SequenceKVView
from microvllm.model.attention import SdpaPagedAttention


# decodes first, then prefill chunks: one from scratch, two resuming after a cached
# prefix; at block size 256 the second decode and the last chunk read keys from two
# blocks, and the last chunk's queries cross from the first block into the second
MIXED_QUERY_LENS = [1, 1, 7, 20, 40]
MIXED_CONTEXT_LENS = [9, 300, 7, 60, 280]
# head layouts a kernel is held to: pytest.mark.parametrize(**HEAD_SHAPES)
HEAD_SHAPES = dict(argnames="n_head, n_kv_head, head_dim", argvalues=[(4, 2, 8), (2, 2, 16), (6, 2, 64)],
                   ids=["gqa", "mha", "gqa-group-of-3"])


def random_step(query_lens, context_lens, block_size, n_kv_head, head_dim, dtype, device="cpu", seed=0):
    """A cache full of random K/V, each sequence's blocks scattered over it, and the view
    of one step; built twice from one seed, so each backend writes into its own copy."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 1  # block 0 only pads the block tables
    cache = PagedKVCache(2, num_blocks, block_size, n_kv_head, head_dim, dtype, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    owned = (torch.randperm(num_blocks - 1, generator=gen) + 1).split(blocks_per_seq)
    block_tables = torch.zeros(len(owned), max(blocks_per_seq), dtype=torch.int64)
    slots = []
    for row, (blocks, q, c) in enumerate(zip(owned, query_lens, context_lens)):
        block_tables[row, :len(blocks)] = blocks
        positions = torch.arange(c - q, c)
        slots.append(blocks[positions // block_size] * block_size + positions % block_size)
    return SequenceKVView(cache, torch.cat(slots).to(device), block_tables.to(device), query_lens, context_lens)


def as_decode_view(view: SequenceKVView, table_width: int) -> DecodeKVView:
    """The same decode-only step as graphs see it: lengths on the device, block tables
    widened to table_width with the cache's padding block."""
    device = view.slot_mapping.device
    tables = torch.full((len(view.query_lens), table_width), view.cache.padding_block, device=device)
    tables[:, :view.block_tables.shape[1]] = view.block_tables
    return DecodeKVView(view.cache, view.slot_mapping, tables, torch.tensor(view.context_lens, device=device))


def compare_decode_twin(decode_backend, context_lens, block_size, table_width, window, dtype=torch.float32,
                        device="cpu", n_head=4, n_kv_head=2, head_dim=16):
    """(decode twin's output, SdpaPagedAttention's output) for one decode-only step (GQA 4:2 unless told)."""
    return compare_backends(lambda view: decode_backend(as_decode_view(view, table_width)),
                            [1] * len(context_lens), context_lens, block_size, n_head, n_kv_head, head_dim,
                            window, dtype, device)


def compare_backends(backend, query_lens, context_lens, block_size, n_head, n_kv_head, head_dim,
                     window, dtype=torch.float32, device="cpu"):
    """(backend's output, SdpaPagedAttention's output) for layer 1 of one random step."""
    gen = torch.Generator().manual_seed(1)
    n = sum(query_lens)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen).to(device, dtype) for h in (n_head, n_kv_head, n_kv_head))
    views = [random_step(query_lens, context_lens, block_size, n_kv_head, head_dim, dtype, device)
             for _ in range(2)]
    got = backend(views[0])(1, q, k, v, window)
    want = SdpaPagedAttention(views[1])(1, q, k, v, window)
    assert torch.equal(views[0].cache.k, views[1].cache.k)  # the step's K/V were written
    return got, want
