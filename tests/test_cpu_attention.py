"""The CPU backend (C kernel for decodes and short chunks, SDPA for long prefill chunks)
computes what a plain dense causal attention computes.

Its mixed batches are held to SDPA with the other backends' in test_attention_backends.py.
"""

import numpy as np
import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.cpu import attention as cpu_attention
from microvllm.model.attention import SdpaPagedAttention, window_mask
from microvllm.platform import resolve_attention_backend
from microvllm.cpu.attention import MAX_KERNEL_PROMPT_LEN, MAX_KERNEL_QUERY_LEN, CpuPagedAttention, work_items
from microvllm.cpu.kernels import load_library
from helpers import MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, compare_backends, random_step

CPU = torch.device("cpu")

if load_library() is None:
    pytest.skip("no C compiler to build the CPU decode kernel", allow_module_level=True)


@pytest.mark.parametrize("window", [None, 0, 20, 500])
def test_decode_only_batch_matches_sdpa(window):
    got, want = compare_backends(CpuPagedAttention, [1, 1, 1, 1], [1, 33, 130, 300], 4, 8, 2, 16, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
def test_bfloat16_cache_matches_sdpa(window):
    got, want = compare_backends(CpuPagedAttention, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, 16, 6, 2, 64,
                                 window, dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# the kernel compiles head_dim 64 (in HEAD_SHAPES) and 128 into their own copies; 20 takes
# the general path and is not a multiple of its 8 partial sums; block size 32 is split into
# two tiles of 16 positions
@pytest.mark.parametrize("n_head, n_kv_head, head_dim", [(8, 2, 128), (3, 1, 20)], ids=["d128", "d20"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_head_dims_and_tiles_match_sdpa(n_head, n_kv_head, head_dim, block_size, dtype, tolerance, window):
    got, want = compare_backends(CpuPagedAttention, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, block_size,
                                 n_head, n_kv_head, head_dim, window, dtype=dtype)
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def dense_attention(view, layer_idx, q, window):
    """Each sequence's queries against its whole context, gathered and masked in float64."""
    outputs, first_token = [], 0
    for row, (query_len, context) in enumerate(zip(view.query_lens, view.context_lens)):
        blocks = view.block_tables[row, :-(-context // view.block_size)]
        keys, values = (pool[layer_idx][blocks].flatten(0, 1)[:context].double() for pool in (view.cache.k, view.cache.v))
        queries = q[first_token:first_token + query_len].double()
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * q.shape[2] ** -0.5
        visible = window_mask(torch.arange(context - query_len, context), torch.arange(context), window)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("hqk,khd->qhd", weights, values))
        first_token += query_len
    return torch.cat(outputs).to(q.dtype)


def kernel_step(query_lens, context_lens, block_size, n_head, n_kv_head, head_dim, window, dtype):
    """(the kernel's output, the dense reference's) for layer 1 of a random step, every
    sequence through the kernel."""
    gen = torch.Generator().manual_seed(2)
    n = sum(query_lens)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen).to(dtype) for h in (n_head, n_kv_head, n_kv_head))
    view = random_step(query_lens, context_lens, block_size, n_kv_head, head_dim, dtype)
    got = CpuPagedAttention(view, max(query_lens), max(query_lens))(1, q, k, v, window)
    return got, dense_attention(view, 1, q, window)


# contexts cross block boundaries (block size 16, and 4 for many small blocks); a
# 100-token chunk is cut into several work items; the blocks lie scattered over the pool
@pytest.mark.parametrize("query_len", [1, 2, 5, 16, 100])
@pytest.mark.parametrize("window", [None, 0, 20])
@pytest.mark.parametrize("n_head, n_kv_head, head_dim", [(6, 2, 64), (8, 8, 128), (3, 1, 20)],
                         ids=["gqa-d64", "mha-d128", "gqa-d20"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_kernel_chunks_match_dense_causal_attention(query_len, window, n_head, n_kv_head, head_dim, dtype, tolerance):
    context_lens = [query_len, query_len + 17, query_len + 130]
    got, want = kernel_step([query_len] * 3, context_lens, 16, n_head, n_kv_head, head_dim, window, dtype)
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_kernel_takes_chunks_of_mixed_lengths_and_small_blocks():
    got, want = kernel_step([1, 5, 100, 2, 16], [40, 5, 300, 77, 16], 4, 4, 2, 16, 30, torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def kernel_output(view, layer_idx, q, window, rows_per_item):
    """The kernel's output for every sequence of the step, its queries cut into work items
    of rows_per_item rows."""
    query_lens, context_lens = np.array(view.query_lens), np.array(view.context_lens)
    items = torch.from_numpy(work_items(np.arange(len(query_lens)), query_lens, context_lens,
                                        np.cumsum(query_lens) - query_lens, rows_per_item))
    out, cache, tables = torch.empty_like(q), view.cache, view.block_tables.to(torch.int64).contiguous()
    assert load_library().paged_attention(
        q.data_ptr(), cache.k[layer_idx].data_ptr(), cache.v[layer_idx].data_ptr(), tables.data_ptr(),
        items.data_ptr(), out.data_ptr(), 0, len(items), tables.shape[1], q.shape[1], cache.k.shape[3],
        q.shape[2], cache.block_size, -1 if window is None else window, q.shape[2] ** -0.5,
        int(q.dtype == torch.bfloat16)) == 0
    return out


@pytest.mark.parametrize("window", [None, 3, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_row_computes_the_same_bits_in_a_chunk_as_in_a_decode(window, dtype):
    # a speculative check's rows must give exactly what decoding them one by one gives,
    # or accepting a guess would depend on speculating
    view = random_step([9, 5], [141, 40], 16, 2, 64, dtype)
    q = torch.randn(14, 6, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    one_item = kernel_output(view, 1, q, window, rows_per_item=16)
    assert torch.equal(one_item, kernel_output(view, 1, q, window, rows_per_item=1))
    assert torch.equal(one_item, kernel_output(view, 1, q, window, rows_per_item=4))


def test_the_kernel_takes_short_chunks_and_whole_prompts_up_to_their_limits():
    # decodes and checks; a continued chunk at the limit and one past it; a fresh prompt
    # past the chunk limit (the kernel's) and a continued chunk as long (SDPA's)
    query_lens = [1, 5, MAX_KERNEL_QUERY_LEN, MAX_KERNEL_QUERY_LEN + 1, 40, 40, MAX_KERNEL_PROMPT_LEN + 1]
    context_lens = [100, 300, 1000, 1000, 40, 41, MAX_KERNEL_PROMPT_LEN + 1]
    backend = CpuPagedAttention(random_step(query_lens, context_lens, 16, 1, 8, torch.float32))
    assert backend.kernel_seqs.tolist() == [0, 1, 2, 4]


def test_chunks_the_kernel_does_not_take_are_sdpa_exactly():
    query_len = MAX_KERNEL_QUERY_LEN + 1
    got, want = compare_backends(CpuPagedAttention, [query_len, query_len + 5], [query_len + 3, 200], 4, 4, 2, 16, None)
    assert torch.equal(got, want)


def test_kernel_limits_must_not_be_negative():
    view = random_step([1], [5], 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="max_kernel_prompt_len must be >= 0"):
        CpuPagedAttention(view, max_kernel_prompt_len=-1)


# decodes; then checks and a 20-token chunk, cut into two work items
@pytest.mark.parametrize("query_lens", [[1] * 6, [1, 5, 9, 20, 1, 7]], ids=["decodes", "chunks"])
def test_a_batch_split_across_threads_gives_the_single_thread_result(query_lens, monkeypatch):
    lens = [1, 33, 130, 300, 7, 64]
    one_thread, _ = compare_backends(CpuPagedAttention, query_lens, lens, 4, 4, 2, 16, None)
    threads = torch.get_num_threads()
    monkeypatch.setattr(CpuPagedAttention, "MIN_KEYS_PER_THREAD", 1)
    torch.set_num_threads(3)
    try:
        split, _ = compare_backends(CpuPagedAttention, query_lens, lens, 4, 4, 2, 16, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one_thread)


@pytest.mark.parametrize("lens, parts", [([5, 5, 5, 5], 2), ([100, 1, 1, 1], 3), ([3], 4), ([1, 2, 3, 4, 5, 6], 3)])
def test_split_covers_every_item_once_in_order(lens, parts):
    ranges = cpu_attention._split(np.array(lens), parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(lens) and len(ranges) <= parts
    assert all(end == next_first for (_, end), (next_first, _) in zip(ranges, ranges[1:]))
    assert all(first < end for first, end in ranges)


def test_auto_picks_the_kernel_for_float32_and_bfloat16_on_cpu_and_sdpa_otherwise():
    assert resolve_attention_backend("auto", CPU, torch.float32).step is CpuPagedAttention
    assert resolve_attention_backend("auto", CPU, torch.bfloat16).step is CpuPagedAttention
    assert resolve_attention_backend("auto", CPU, torch.float16).step is SdpaPagedAttention
    with pytest.raises(ValueError, match="attention_backend='cpu' needs device='cpu', dtype 'float32' or"):
        resolve_attention_backend("cpu", CPU, torch.float16)


def test_without_a_compiler_auto_falls_back_to_sdpa_and_cpu_is_refused(fresh_kernel_cache, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_kernel_cache / "no-such-cc"))
    assert resolve_attention_backend("auto", CPU, torch.float32).step is SdpaPagedAttention
    with pytest.raises(ValueError, match=r"a C compiler \(cc, or \$CC\)"):
        resolve_attention_backend("cpu", CPU, torch.float32)


@pytest.mark.parametrize("max_num_batched_tokens", [16, 30])
@pytest.mark.parametrize("checkpoint", ["checkpoint_dir", "windowed_checkpoint"])
def test_llm_greedy_tokens_and_logprobs_match_sdpa(checkpoint, max_num_batched_tokens, request):
    # block_size 4 and chunked prefill: one-token chunks and decodes share steps with
    # prefill chunks; at 30 tokens a step, the 56-token prompt's second chunk (29 tokens
    # after 27 cached) goes to SDPA beside a decode in the kernel; the windowed model's
    # odd layers see the last 32 keys
    prompts = [[(7 * i + 3 * j) % 256 for i in range(n)] for j, n in enumerate((5, 56, 45, 23, 30, 17))]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
    outputs = [LLM(request.getfixturevalue(checkpoint), attention_backend=backend, block_size=4,
                   max_num_batched_tokens=max_num_batched_tokens).generate(prompts, params, use_tqdm=False)
               for backend in ("sdpa", "cpu")]
    for want, got in zip(*outputs):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].cumulative_logprob == pytest.approx(want.outputs[0].cumulative_logprob, abs=1e-4)
