"""The CPU backend (C decode kernel, SDPA for prefill chunks) computes what SDPA computes.

Its mixed batches are held to SDPA with the other backends' in test_attention_backends.py.
"""

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.cpu import attention as cpu_attention
from microvllm.model.attention import SdpaPagedAttention
from microvllm.platform import resolve_attention_backend
from microvllm.cpu.attention import CpuPagedAttention
from microvllm.cpu.kernels import load_library
from helpers import MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, compare_backends

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


def test_prefill_only_batch_is_sdpa_exactly():
    got, want = compare_backends(CpuPagedAttention, [7, 20], [7, 60], 4, 4, 2, 16, None)
    assert torch.equal(got, want)


def test_a_batch_split_across_threads_gives_the_single_thread_result(monkeypatch):
    lens = [1, 33, 130, 300, 7, 64]
    one_thread, _ = compare_backends(CpuPagedAttention, [1] * len(lens), lens, 4, 4, 2, 16, None)
    threads = torch.get_num_threads()
    monkeypatch.setattr(CpuPagedAttention, "MIN_KEYS_PER_THREAD", 1)
    torch.set_num_threads(3)
    try:
        split, _ = compare_backends(CpuPagedAttention, [1] * len(lens), lens, 4, 4, 2, 16, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one_thread)


@pytest.mark.parametrize("lens, parts", [([5, 5, 5, 5], 2), ([100, 1, 1, 1], 3), ([3], 4), ([1, 2, 3, 4, 5, 6], 3)])
def test_split_covers_every_sequence_once_in_order(lens, parts):
    ranges = cpu_attention._split(lens, parts)
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


def test_llm_greedy_tokens_and_logprobs_match_sdpa(checkpoint_dir):
    # block_size 4 and 16-token chunks: one-token chunks and decodes share steps with prefills
    prompts = [[(7 * i + 3 * j) % 256 for i in range(n)] for j, n in enumerate((5, 23, 30, 17))]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
    outputs = [LLM(checkpoint_dir, attention_backend=backend, block_size=4, max_num_batched_tokens=16)
               .generate(prompts, params, use_tqdm=False) for backend in ("sdpa", "cpu")]
    for want, got in zip(*outputs):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].cumulative_logprob == pytest.approx(want.outputs[0].cumulative_logprob, abs=1e-4)
