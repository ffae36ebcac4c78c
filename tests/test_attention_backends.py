"""Every paged-attention backend computes what the SDPA backend computes, on one step
that mixes decodes with prefill chunks (from scratch and resuming after a cached prefix).

A backend that cannot run here is skipped for its own cases only: the CPU kernel needs
a C compiler, Triton needs triton (and runs in its interpreter). Each backend's other
tests live in its own file: test_cpu_attention.py, test_triton_attention.py,
test_flash_attention.py (flash_attn's 256-key blocks and 16-bit caches need a step of
their own).
"""

import pytest
import torch

from helpers import (HEAD_SHAPES, MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, TRITON_MIXED_CONTEXT_LENS,
                     TRITON_MIXED_QUERY_LENS, compare_backends, import_triton_attention)
from microvllm.cpu.kernels import load_library


@pytest.fixture
def backend(request, monkeypatch):
    """(paged backend, query lengths, context lengths) of the mixed step it is held to."""
    if request.param == "cpu":
        if load_library() is None:
            pytest.skip("no C compiler to build the CPU decode kernel")
        from microvllm.cpu.attention import CpuPagedAttention
        return CpuPagedAttention, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS
    assert request.param == "triton"
    paged = import_triton_attention().TritonPagedAttention  # skips where triton is missing
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return paged, TRITON_MIXED_QUERY_LENS, TRITON_MIXED_CONTEXT_LENS


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(**HEAD_SHAPES)
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_matches_sdpa(backend, block_size, n_head, n_kv_head, head_dim, window):
    paged_backend, query_lens, context_lens = backend
    got, want = compare_backends(paged_backend, query_lens, context_lens,
                                 block_size, n_head, n_kv_head, head_dim, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
