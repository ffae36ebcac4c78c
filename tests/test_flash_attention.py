"""The FlashAttention backend computes what the SDPA backend computes.

flash_attn needs CUDA, so these tests run it as the CPU test double in fake_flash_attn.py.
The first tests hold the double to flash_attn's documented behaviour; the others run
FlashPagedAttention on top of it. flash_attn takes only float16/bfloat16 and, for a paged
cache, block sizes that are multiples of 256, so the steps here do too.
"""

import pytest
import torch
import torch.nn.functional as F

import fake_flash_attn
from microvllm.model.attention import FlashDecodeAttention, FlashPagedAttention
from microvllm.platform import resolve_attention_backend
from helpers import MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, as_decode_view, compare_backends, compare_decode_twin

pytestmark = pytest.mark.usefixtures("fake_flash_attn_installed")

BLOCK_SIZE = 256


def paged(dense: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[B, L, n_kv_head, d] keys laid out in the blocks of block_table [B, L / BLOCK_SIZE]."""
    pages = dense.unflatten(1, (-1, BLOCK_SIZE)).flatten(0, 1)
    cache = torch.empty(block_table.numel(), *pages.shape[1:], dtype=dense.dtype)
    cache[block_table.flatten().long()] = pages
    return cache


def one_sequence_call(seqlen_q, seqlen_k, q, k_cache, v_cache, **options):
    """flash_attn_varlen_func's arguments for one sequence whose keys start in block 0."""
    num_blocks = k_cache.shape[0]
    return dict(q=q, k=k_cache, v=v_cache,
                cu_seqlens_q=torch.tensor([0, seqlen_q], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, seqlen_k], dtype=torch.int32),
                max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k,
                block_table=torch.arange(num_blocks, dtype=torch.int32).unsqueeze(0), **options)


def test_fake_varlen_matches_dense_causal_softmax():
    gen = torch.Generator().manual_seed(0)
    seqlen, n_head, n_kv_head, head_dim = 300, 4, 2, 16
    q = torch.randn(seqlen, n_head, head_dim, generator=gen).half()
    k, v = (torch.randn(1, 2 * BLOCK_SIZE, n_kv_head, head_dim, generator=gen).half() for _ in range(2))
    got = fake_flash_attn.flash_attn_varlen_func(
        **one_sequence_call(seqlen, seqlen, q, k.view(2, BLOCK_SIZE, n_kv_head, head_dim),
                            v.view(2, BLOCK_SIZE, n_kv_head, head_dim), causal=True))
    want = F.scaled_dot_product_attention(
        *(x[:seqlen].float().transpose(0, 1) for x in (q, k[0], v[0])), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want.transpose(0, 1).half(), atol=2e-3, rtol=2e-3)


# flash_attn's docstring examples (1 = key visible), and one sliding window
@pytest.mark.parametrize("seqlen_q, seqlen_k, window_size, visible", [
    (2, 5, (-1, -1), [[1, 1, 1, 1, 0],
                      [1, 1, 1, 1, 1]]),
    (5, 2, (-1, -1), [[0, 0],
                      [0, 0],
                      [0, 0],
                      [1, 0],
                      [1, 1]]),
    (3, 5, (1, 0), [[0, 1, 1, 0, 0],
                    [0, 0, 1, 1, 0],
                    [0, 0, 0, 1, 1]]),
], ids=["fewer-queries", "more-queries", "window-1"])
def test_fake_masks_align_to_the_bottom_right_corner(seqlen_q, seqlen_k, window_size, visible):
    # equal scores and one-hot values: each output row is its visible keys, averaged
    head_dim = 16
    q = torch.zeros(seqlen_q, 1, head_dim, dtype=torch.float16)
    k_cache = torch.zeros(1, BLOCK_SIZE, 1, head_dim, dtype=torch.float16)
    v_cache = torch.eye(BLOCK_SIZE, head_dim, dtype=torch.float16).view(1, BLOCK_SIZE, 1, head_dim)
    out = fake_flash_attn.flash_attn_varlen_func(
        **one_sequence_call(seqlen_q, seqlen_k, q, k_cache, v_cache, causal=True, window_size=window_size))
    assert (out[:, 0, :seqlen_k] > 0).int().tolist() == visible


@pytest.mark.parametrize("window", [None, 20])
def test_fake_kvcache_decode_matches_dense_attention(window):
    gen = torch.Generator().manual_seed(0)
    cache_seqlens = [1, 40, 300]
    n_head, n_kv_head, head_dim = 4, 2, 16
    batch_size, padded_len = len(cache_seqlens), 2 * BLOCK_SIZE
    q = torch.randn(batch_size, 1, n_head, head_dim, generator=gen).half()
    # keys past each sequence's length are random too: only cache_seqlens may hide them
    k, v = (torch.randn(batch_size, padded_len, n_kv_head, head_dim, generator=gen).half() for _ in range(2))
    block_table = torch.randperm(2 * batch_size, generator=gen).view(batch_size, 2).int()
    got = fake_flash_attn.flash_attn_with_kvcache(
        q, paged(k, block_table), paged(v, block_table),
        cache_seqlens=torch.tensor(cache_seqlens, dtype=torch.int32), block_table=block_table,
        causal=True, window_size=(-1 if window is None else window, 0))

    lengths = torch.tensor(cache_seqlens).view(batch_size, 1, 1, 1)
    key_pos = torch.arange(padded_len)
    visible = key_pos < lengths
    if window is not None:
        visible &= key_pos >= lengths - 1 - window
    want = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)),
                                          attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(got, want.transpose(1, 2).half(), atol=2e-3, rtol=2e-3)


SMALL_BLOCKS = torch.zeros(16, 16, 1, 16, dtype=torch.float16)


@pytest.mark.parametrize("misuse, message", [
    (dict(cu_seqlens_q=torch.tensor([0, 3])), "cu_seqlens_q must have dtype int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 5])), "cu_seqlens_k must have dtype int32"),
    (dict(block_table=torch.tensor([[0]])), "block_table must have dtype torch.int32"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int32)[:, ::2]), "block_table must have contiguous last"),
    (dict(k=SMALL_BLOCKS, v=SMALL_BLOCKS), "block size must be divisible by 256"),
    (dict(q=torch.zeros(3, 2, 16)), "only supports fp16 and bf16"),
    (dict(max_seqlen_q=2), "max_seqlen_q is below a query length"),
], ids=["cu_seqlens_q-int64", "cu_seqlens_k-int64", "block_table-int64", "block_table-strided",
        "block_size-16", "float32", "max_seqlen_q-too-small"])
def test_fake_varlen_rejects_what_flash_attn_rejects(misuse, message):
    q = torch.zeros(3, 2, 16, dtype=torch.float16)
    cache = torch.zeros(1, BLOCK_SIZE, 1, 16, dtype=torch.float16)
    call = one_sequence_call(3, 5, q, cache, cache, causal=True) | misuse
    with pytest.raises(RuntimeError, match=message):
        fake_flash_attn.flash_attn_varlen_func(**call)


def test_fake_kvcache_rejects_int64_cache_seqlens():
    cache = torch.zeros(1, BLOCK_SIZE, 1, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="cache_seqlens must have dtype int32"):
        fake_flash_attn.flash_attn_with_kvcache(
            torch.zeros(1, 1, 2, 16, dtype=torch.float16), cache, cache,
            cache_seqlens=torch.tensor([5]), block_table=torch.zeros(1, 1, dtype=torch.int32))


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_matches_sdpa(n_head, n_kv_head, window):
    got, want = compare_backends(FlashPagedAttention, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, BLOCK_SIZE,
                                 n_head, n_kv_head, 16, window, dtype=torch.float16)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("window", [None, 20])
def test_decode_only_batch_matches_sdpa(window):
    got, want = compare_backends(FlashPagedAttention, [1, 1, 1], [1, 33, 300], BLOCK_SIZE, 4, 2, 16, window,
                                 dtype=torch.float16)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_bfloat16_cache_matches_sdpa():
    got, want = compare_backends(FlashPagedAttention, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, BLOCK_SIZE,
                                 4, 2, 16, None, dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# the 512-key context fills its two-block table
@pytest.mark.parametrize("window", [None, 20])
def test_decode_twin_matches_sdpa(window):
    got, want = compare_decode_twin(FlashDecodeAttention, [1, 33, 300, 512], BLOCK_SIZE, 2, window,
                                    dtype=torch.float16)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_auto_picks_flash_attn_on_cuda_for_16_bit_caches_only():
    cuda = torch.device("cuda")
    chosen = resolve_attention_backend("auto", cuda, torch.bfloat16)
    assert (chosen.name, chosen.decode, chosen.default_block_size) == ("flash_attn", FlashDecodeAttention, 256)
    assert resolve_attention_backend("auto", cuda, torch.float32).name != "flash_attn"


def test_flash_attn_refuses_float32():
    with pytest.raises(ValueError, match="needs dtype float16 or bfloat16"):
        resolve_attention_backend("flash_attn", torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("backend", [FlashPagedAttention, FlashDecodeAttention])
def test_layers_without_a_window_ask_flash_attn_for_none(backend, monkeypatch):
    # (-1, 0) would be a sliding window to flash_attn's one-query decode path, which drops
    # causal there; (-1, -1) keeps its plain fast path
    windows = []
    kernel = "flash_attn_varlen_func" if backend is FlashPagedAttention else "flash_attn_with_kvcache"
    real = getattr(fake_flash_attn, kernel)

    def recording(*args, window_size, **kwargs):
        windows.append(window_size)
        return real(*args, window_size=window_size, **kwargs)
    monkeypatch.setattr(fake_flash_attn, kernel, recording)
    as_backend = backend if backend is FlashPagedAttention else (
        lambda view: FlashDecodeAttention(as_decode_view(view, 2)))
    for window in (None, 20):
        compare_backends(as_backend, [1, 1], [5, 300], BLOCK_SIZE, 4, 2, 16, window, dtype=torch.float16)
    assert windows == [(-1, -1), (20, 0)]
