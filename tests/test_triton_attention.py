"""The Triton paged-attention kernel computes what the SDPA backend computes.

Runs on CPU in Triton's interpreter, so shapes stay tiny. TRITON_INTERPRET=1 is read
when the kernel is decorated (at import) and by the backend check, so it is set for
the import and for this module's tests only. Its mixed batches are held to SDPA with
the other backends' in test_attention_backends.py.
"""

import pytest
import torch

from helpers import (TRITON_MIXED_CONTEXT_LENS, TRITON_MIXED_QUERY_LENS, compare_backends, compare_decode_twin,
                     import_triton_attention)
from microvllm import LLM, SamplingParams
from microvllm.platform import resolve_attention_backend

triton_attention = import_triton_attention()  # skips this module where triton is missing
TritonDecodeAttention, TritonPagedAttention = (triton_attention.TritonDecodeAttention,
                                               triton_attention.TritonPagedAttention)


@pytest.fixture(autouse=True)
def interpret_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("window", [None, 20])
def test_decode_only_batch_matches_sdpa(window):
    got, want = compare_backends(TritonPagedAttention, [1, 1, 1], [1, 33, 130], 4, 8, 2, 16, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
def test_decode_twin_matches_sdpa(window):
    got, want = compare_decode_twin(TritonDecodeAttention, [1, 33, 130, 160], 4, 40, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_float16_cache_matches_sdpa():
    got, want = compare_backends(TritonPagedAttention, TRITON_MIXED_QUERY_LENS, TRITON_MIXED_CONTEXT_LENS, 16,
                                 4, 2, 16, None, dtype=torch.float16)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_llm_greedy_tokens_match_default_backend(checkpoint_dir):
    # block_size 4 and 16-token chunks: prefill chunks resume mid-sequence beside decodes
    prompts = [[(7 * i + 3 * j) % 256 for i in range(n)] for j, n in enumerate((5, 23, 30))]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    outputs = [LLM(checkpoint_dir, attention_backend=backend, block_size=4, max_num_batched_tokens=16)
               .generate(prompts, params, use_tqdm=False) for backend in ("auto", "triton")]
    for want, got in zip(*outputs):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].cumulative_logprob == pytest.approx(want.outputs[0].cumulative_logprob, abs=1e-4)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="attention_backend='triton' needs"):
        resolve_attention_backend("triton", torch.device("cpu"), torch.float32)
    assert resolve_attention_backend("auto", torch.device("cpu"), torch.float32).name != "triton"
