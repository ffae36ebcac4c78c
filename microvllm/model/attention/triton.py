"""TritonPagedAttention: one Triton kernel for decodes and prefill chunks, reading
keys and values straight from the paged cache through the block table.
TritonDecodeAttention launches the same kernel for a fixed-size decode batch whose
lengths live only on the device, as a CUDA graph needs.

A program owns one query tile of one sequence and one KV head. Its rows are the
tile's tokens times the query heads that share that KV head (GQA), so each key tile
is loaded once for the whole group and a decode's heads share one tensor-core tile. It
walks the keys in tiles of BLOCK_N positions with an online softmax in fp32, from the
first key the tile's earliest query can see (window) to the tile's last query
(causal); keys outside that span are never read.

Each key's slot is looked up through the block table on its own, so a key tile may
span several cache blocks or part of one: every block_size that is a power of two
(1, 2, 4, ... ) works. head_dim is zero-padded inside the kernel to a power of two of
at least 16, the smallest that tl.dot takes.

On CPU tensors the kernel runs only under TRITON_INTERPRET=1, set before this module
is imported (the decorator reads it), which is how the tests check it against SDPA.
"""

import torch
import triton
import triton.language as tl

from ...arithmetic import cdiv

# (rows of a query tile, warps): a small tile for decode-only steps, a larger one when
# prefill chunks come; 64 rows need 8 warps, or the accumulator spills out of registers
DECODE_TILE = (16, 4)
PREFILL_TILE = (64, 8)
# a key tile of at most 64 keys and 16 KB, so K and V tiles, staged in shared memory
# for pipelining, fit the ~100 KB of consumer GPUs (fp32 at head_dim 128: 32 keys)
MAX_KEY_TILE, KEY_TILE_BYTES = 64, 16384
MIN_DOT_SIZE = 16


@triton.jit
def _paged_attention_kernel(
        out_ptr, q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr,
        tile_seqs_ptr, tile_starts_ptr, cu_query_lens_ptr, context_lens_ptr,
        stride_q_token, stride_q_head, stride_slot, stride_kv_head, stride_table,
        scale_log2, window,
        HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, GROUP: tl.constexpr,
        PADDED_GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr):
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile)
    tile_start = tl.load(tile_starts_ptr + tile)
    first_token = tl.load(cu_query_lens_ptr + seq)
    query_len = tl.load(cu_query_lens_ptr + seq + 1) - first_token
    context_len = tl.load(context_lens_ptr + seq)

    # row r is token tile_start + r // PADDED_GROUP, query head r % PADDED_GROUP of the group
    rows = tl.arange(0, BLOCK_Q * PADDED_GROUP)
    token = tile_start + rows // PADDED_GROUP
    head = kv_head * GROUP + rows % PADDED_GROUP
    row_valid = (token < query_len) & (rows % PADDED_GROUP < GROUP)
    query_pos = context_len - query_len + token   # the new tokens end the context
    dims = tl.arange(0, PADDED_DIM)
    dim_valid = dims < HEAD_DIM
    # out is laid out like q
    row_offsets = (first_token + token)[:, None] * stride_q_token + head[:, None] * stride_q_head
    row_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + row_offsets + dims[None, :], mask=row_mask, other=0.0)

    first_query_pos = context_len - query_len + tile_start
    key_end = tl.minimum(first_query_pos + BLOCK_Q, context_len)
    # a finite floor, not -inf: a row that has seen only masked keys keeps
    # exp2(m - m_new) = 1 instead of exp2(-inf + inf) = NaN
    m = tl.full([BLOCK_Q * PADDED_GROUP], -1e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_Q * PADDED_GROUP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * PADDED_GROUP, PADDED_DIM], dtype=tl.float32)
    for key_start in range(tl.maximum(first_query_pos - window, 0), key_end, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)
        key_valid = key_pos < key_end
        block = tl.load(block_tables_ptr + seq * stride_table + key_pos // BLOCK_SIZE,
                        mask=key_valid, other=0)
        # int64 block ids keep slot offsets in a large cache from overflowing int32
        kv_offsets = ((block * BLOCK_SIZE + key_pos % BLOCK_SIZE)[:, None] * stride_slot
                      + kv_head * stride_kv_head + dims[None, :])
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_pool_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_pool_ptr + kv_offsets, mask=kv_mask, other=0.0)

        # "ieee": fp32 caches would otherwise be multiplied in tf32 (ignored for 16-bit)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        distance = query_pos[:, None] - key_pos[None, :]
        scores = tl.where((distance >= 0) & (distance <= window), scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    # padding rows saw no key (l = 0); they are not stored, but must not divide by zero
    y = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + row_offsets + dims[None, :], y.to(out_ptr.dtype.element_ty), mask=row_mask)


class _TritonAttention:
    """Launches the kernel over `self.view` with `self.tables` (cu_query_lens,
    context_lens, tile_seqs, tile_starts), built on the first layer's call."""

    def __init__(self, view, tile):
        self.view = view
        self.tile_rows, self.num_warps = tile
        self.tables = None

    def __call__(self, layer_idx, q, k, v, window):
        view = self.view
        view.write(layer_idx, k, v)
        k_pool, v_pool = view.cache.flat_pools(layer_idx)
        q = q.contiguous()
        out = torch.empty_like(q)
        n_head, head_dim = q.shape[1], q.shape[2]
        n_kv_head = k_pool.shape[1]
        group = n_head // n_kv_head
        padded_group = triton.next_power_of_2(group)
        block_q = max(1, self.tile_rows // padded_group)
        padded_dim = max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim))
        key_tile = max(MIN_DOT_SIZE, min(MAX_KEY_TILE,
                                         KEY_TILE_BYTES // (padded_dim * k_pool.element_size())))
        if self.tables is None:
            self.tables = self._step_tables(block_q)
        cu_query_lens, context_lens, tile_seqs, tile_starts = self.tables
        _paged_attention_kernel[(len(tile_seqs), n_kv_head)](
            out, q, k_pool, v_pool, view.block_tables,
            tile_seqs, tile_starts, cu_query_lens, context_lens,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), view.block_tables.stride(0),
            head_dim ** -0.5 * 1.4426950408889634,  # times log2(e): the kernel uses exp2
            view.max_context_len if window is None else window,
            HEAD_DIM=head_dim, PADDED_DIM=padded_dim, GROUP=group, PADDED_GROUP=padded_group,
            BLOCK_Q=block_q, BLOCK_N=key_tile, BLOCK_SIZE=view.block_size, num_warps=self.num_warps)
        return out


class TritonPagedAttention(_TritonAttention):
    def __init__(self, view):
        super().__init__(view, DECODE_TILE if view.max_query_len == 1 else PREFILL_TILE)

    def _step_tables(self, block_q: int):
        """Only real tiles are launched. Built on the device from the view's running
        sums: the host knows the tile count, so nothing waits on the GPU."""
        view = self.view
        query_lens = view.cu_query_lens.diff()
        tiles = (query_lens + block_q - 1) // block_q
        num_tiles = sum(cdiv(n, block_q) for n in view.query_lens)
        seqs = torch.arange(len(view.query_lens), device=query_lens.device)
        tile_seqs = torch.repeat_interleave(seqs, tiles, output_size=num_tiles)
        first_tiles = torch.cumsum(tiles, 0) - tiles
        tile_starts = (torch.arange(num_tiles, device=query_lens.device) - first_tiles[tile_seqs]) * block_q
        return tuple(t.to(torch.int32) for t in (view.cu_query_lens, view.cu_context_lens.diff(),
                                                 tile_seqs, tile_starts))


class TritonDecodeAttention(_TritonAttention):
    """One tile per sequence, its one token at offset 0; tables built on the device."""

    def __init__(self, view):
        super().__init__(view, DECODE_TILE)

    def _step_tables(self, block_q: int):
        num_seqs, device = len(self.view.slot_mapping), self.view.slot_mapping.device
        seqs = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)
        return seqs, self.view.context_lens.to(torch.int32), seqs[:-1], torch.zeros_like(seqs[:-1])
