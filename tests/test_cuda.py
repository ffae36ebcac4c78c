"""The CUDA paths on a real GPU: captured graphs, compiled Triton kernels, flash_attn,
and the KV cache sized from gpu_memory_utilization.

Skipped where there is no CUDA device (CI has none). On a GPU machine run this file on
its own, `python -m pytest -q tests/test_cuda.py`, so that the Triton kernels are
compiled for the GPU rather than imported in interpreter mode by the CPU tests. Every
engine here but the sizing tests' gets an explicit number of blocks, and each test gives
its memory back before the next one starts (checked).
"""

import gc

import pytest
import torch
from helpers import (MIXED_CONTEXT_LENS, MIXED_QUERY_LENS, compare_backends, compare_decode_twin, make_prompts,
                     varied_lengths)

from benchmarks.gpu_targets import release_engine_memory
from microvllm import LLM, SamplingParams
from microvllm.engine.config import EngineConfig
from microvllm.engine.memory import gpu_bytes_for_kv_cache
from microvllm.engine.sampler import SampledTokens
from microvllm.platform import resolve_attention_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def gives_its_memory_back():
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(CUDA)
    yield
    release_engine_memory(CUDA, baseline)


class ForcedTokens:
    """Stands in for the sampler: keeps every row's logits by (request, output position)
    and picks the token `tokens` gives for it, or the argmax when there is none, so two
    engines fed the same tokens can be compared logit for logit."""

    def __init__(self, tokens: dict | None = None):
        self.tokens, self.logits = tokens, {}

    def __call__(self, logits, seqs):
        ids = []
        for row, seq in enumerate(seqs):
            key = (seq.request.request_id, seq.num_output_tokens)
            self.logits[key] = logits[row].float().cpu()
            ids.append(int(self.logits[key].argmax()) if self.tokens is None else self.tokens[key])
        return SampledTokens(ids)


def step_logits(checkpoint, settings, prompts, params, tokens=None) -> dict:
    llm = LLM(checkpoint, **settings)
    forced = llm.engine.runner.sampler = ForcedTokens(tokens)
    llm.generate(prompts, params, use_tqdm=False)
    return forced.logits


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_captured_graphs_match_eager_steps(windowed_checkpoint, backend):
    # padded graph batches may pick other kernels than eager steps, so near-ties between
    # random logits could flip a greedy token: both engines are fed eager's tokens and
    # their logits compared within a tolerance
    if backend == "triton":
        pytest.importorskip("triton")
    prompts = make_prompts(23, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True) for p in varied_lengths(23)]
    settings = dict(device="cuda", dtype="float32", attention_backend=backend, block_size=4, max_num_seqs=40,
                    num_blocks=1024)
    eager = step_logits(windowed_checkpoint, dict(settings, enforce_eager=True), prompts, params)
    tokens = {key: int(row.argmax()) for key, row in eager.items()}
    graphs = step_logits(windowed_checkpoint, settings, prompts, params, tokens)
    assert graphs.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(graphs[key], eager[key], atol=1e-3, rtol=1e-3)


def test_graphs_are_captured_on_cuda_unless_eager(checkpoint_dir):
    llm = LLM(checkpoint_dir, device="cuda", num_blocks=64)
    assert llm.engine.runner.decode_graphs is not None
    del llm
    gc.collect()
    assert LLM(checkpoint_dir, device="cuda", num_blocks=64, enforce_eager=True).engine.runner.decode_graphs is None


@pytest.mark.parametrize("backend, block_size", [("triton", 16), ("flash_attn", 256)])
@pytest.mark.parametrize("window", [None, 5])
def test_bfloat16_kernels_match_sdpa(backend, block_size, window):
    pytest.importorskip(backend)
    kernels = resolve_attention_backend(backend, CUDA, torch.bfloat16)
    got, want = compare_backends(kernels.step, MIXED_QUERY_LENS, MIXED_CONTEXT_LENS, block_size, 4, 2, 64,
                                 window, torch.bfloat16, "cuda")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # the 512-key context fills its table
    got, want = compare_decode_twin(kernels.decode, [1, 33, 300, 512], block_size, 512 // block_size, window,
                                    torch.bfloat16, "cuda")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [None, 512])
def test_triton_at_d20_shape_in_bfloat16_matches_sdpa(window):
    # nanochat d20: 10 heads of 128 dims, one KV head each (MHA), the default 16-token blocks
    pytest.importorskip("triton")
    kernels = resolve_attention_backend("triton", CUDA, torch.bfloat16)
    query_lens, context_lens = [1, 1, 1, 100, 700], [40, 900, 2048, 100, 1500]
    got, want = compare_backends(kernels.step, query_lens, context_lens, 16, 10, 10, 128, window,
                                 torch.bfloat16, "cuda")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    got, want = compare_decode_twin(kernels.decode, [1, 40, 900, 2048], 16, 2048 // 16, window,
                                    torch.bfloat16, "cuda", n_head=10, n_kv_head=10, head_dim=128)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_kv_cache_takes_what_gpu_memory_utilization_leaves(checkpoint_dir):
    utilization = 0.05
    llm = LLM(checkpoint_dir, device="cuda", gpu_memory_utilization=utilization, max_num_seqs=256,
              max_model_len=64, block_size=16)
    free, total = torch.cuda.mem_get_info()
    cache = llm.engine.kv_cache
    # the tiny model's cache is capped at twice what 256 sequences of 64 tokens fill
    assert cache.num_blocks == 2 * 256 * 64 // 16
    assert (total - free) / total <= utilization + 0.01
    engine = llm.engine
    budget = gpu_bytes_for_kv_cache(EngineConfig(checkpoint_dir, gpu_memory_utilization=0.5), engine.model, CUDA,
                                    64, engine.runner.attention_backend.decode, 16)
    assert 0 < budget <= 0.5 * total - (total - free)


def test_step_timing_reads_cuda_events(checkpoint_dir):
    llm = LLM(checkpoint_dir, device="cuda", num_blocks=64, step_timing=True)
    llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats
    assert stats.timed_steps == stats.steps and 0 < stats.device_ms_per_step < 1e3
