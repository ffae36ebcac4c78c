"""The CUDA paths on a real GPU: captured graphs, compiled Triton kernels, flash_attn,
and the KV cache sized from gpu_memory_utilization.

Skipped where there is no CUDA device (CI has none). On a GPU machine run this file on
its own, `python -m pytest -q tests/test_cuda.py`, so that the Triton kernels are
compiled for the GPU rather than imported in interpreter mode by the CPU tests.
"""

import pytest
import torch
from completions import completions, make_prompts, varied_lengths
from paged_steps import MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, compare_backends, compare_decode_twin

from microvllm import LLM
from microvllm.model.attention import resolve_attention_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_captured_graphs_match_eager_steps(windowed_checkpoint, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    prompts, params = make_prompts(23, seed=1), varied_lengths(23)
    settings = dict(device="cuda", dtype="float32", attention_backend=backend, block_size=4, max_num_seqs=40)
    eager = LLM(windowed_checkpoint, enforce_eager=True, **settings)
    graphs = LLM(windowed_checkpoint, **settings)
    assert eager.engine.runner.decode_graphs is None and graphs.engine.runner.decode_graphs is not None
    assert completions(graphs, prompts, params) == completions(eager, prompts, params)


@pytest.mark.parametrize("backend, block_size", [("triton", 16), ("flash_attn", 256)])
@pytest.mark.parametrize("window", [None, 5])
def test_bfloat16_kernels_match_sdpa(backend, block_size, window):
    pytest.importorskip(backend)
    kernels = resolve_attention_backend(backend, torch.device("cuda"), torch.bfloat16)
    got, want = compare_backends(kernels.step, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, block_size, 4, 2, 64,
                                 window, torch.bfloat16, "cuda")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # the 512-key context fills its table
    got, want = compare_decode_twin(kernels.decode, [1, 33, 300, 512], block_size, 512 // block_size, window,
                                    torch.bfloat16, "cuda")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_kv_cache_takes_what_gpu_memory_utilization_leaves(checkpoint_dir):
    utilization = 0.05
    llm = LLM(checkpoint_dir, device="cuda", gpu_memory_utilization=utilization)
    free, total = torch.cuda.mem_get_info()
    cache = llm.engine.kv_cache
    assert (total - free) / total <= utilization + 0.01  # the graphs' pool comes on top
    assert cache.k.nbytes + cache.v.nbytes >= 0.02 * total
