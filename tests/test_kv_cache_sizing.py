"""The KV cache gets the number of blocks that the settings ask for, and says so; the
engine's memory and timing figures."""

import logging
import os
from pathlib import Path

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.engine import memory
from microvllm.platform import cpu as platform_cpu
from microvllm.engine.config import EngineConfig
from microvllm.engine.kv_cache import PagedKVCache
from microvllm.engine.memory import gpu_bytes_for_kv_cache
from microvllm.engine.logprobs import PROMPT_LOGPROBS_CHUNK
from microvllm.model.attention import AttentionBackend, SdpaDecodeAttention

# the default test checkpoint: 4 layers, 2 KV heads of 8 dims, float32 on CPU
BYTES_PER_TOKEN = 2 * 4 * 2 * 8 * 4


def test_num_blocks_is_taken_as_given(checkpoint_dir):
    assert LLM(checkpoint_dir, num_blocks=37).engine.kv_cache.num_blocks == 37


def test_kv_cache_memory_buys_whole_blocks(checkpoint_dir):
    memory = 100 * 16 * BYTES_PER_TOKEN + 5
    assert LLM(checkpoint_dir, kv_cache_memory=memory).engine.kv_cache.num_blocks == 100


def test_cpu_default_holds_every_sequence_at_full_length(checkpoint_dir):
    llm = LLM(checkpoint_dir, max_num_seqs=8, block_size=16)
    assert llm.engine.kv_cache.num_blocks == 8 * 64 // 16  # sequence_len 64


def test_engine_logs_the_kv_cache_size(checkpoint_dir, caplog):
    with caplog.at_level(logging.INFO, logger="microvllm"):
        LLM(checkpoint_dir, num_blocks=40, block_size=8)
    assert "KV cache: 40 blocks of 8 tokens (320 tokens" in caplog.text


def test_block_size_defaults_to_the_attention_backends(checkpoint_dir):
    assert LLM(checkpoint_dir).engine.block_size == 16
    flash_like = AttentionBackend("flash_attn", object, object, block_size_multiple=256)
    assert flash_like.default_block_size == 256


def test_gpu_budget_counts_what_others_hold_and_the_profiled_peak(checkpoint_dir, monkeypatch):
    # the CUDA memory queries stand in for a GPU; the profiling forward itself runs on
    # the CPU, as sequences of max_model_len since max_num_batched_tokens exceeds it
    engine = LLM(checkpoint_dir).engine
    gib = 1024**3
    readings = iter([0, 3 * gib])  # allocated before the forward, then its peak
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: next(readings))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(readings))
    config = EngineConfig(checkpoint_dir, gpu_memory_utilization=0.5, max_num_batched_tokens=100)
    budget = gpu_bytes_for_kv_cache(config, engine.model, torch.device("cpu"), engine.max_model_len)
    assert budget == 40 * gib - 10 * gib - 3 * gib


def test_a_large_budget_is_capped_at_what_the_sequences_can_use(checkpoint_dir, caplog):
    # 4 sequences of 64 tokens fill 16 blocks of 16; twice that stays for prefix caching
    with caplog.at_level(logging.INFO, logger="microvllm"):
        llm = LLM(checkpoint_dir, max_num_seqs=4, block_size=16, kv_cache_memory=2**30)
    assert llm.engine.kv_cache.num_blocks == 2 * 4 * 64 // 16
    assert "KV cache capped at 32 blocks" in caplog.text


def fake_cuda_memory(monkeypatch, readings):
    """The CUDA memory queries on a 80 GiB card with 10 GiB in use; `readings` alternate
    memory_allocated (before a profiled run) and max_memory_allocated (its peak)."""
    gib, readings = 1024**3, iter(readings)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: next(readings))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(readings))


def test_gpu_budget_counts_the_graph_pool_when_decode_steps_replay_graphs(checkpoint_dir, monkeypatch):
    # the largest decode batch's forward (run here on the CPU) stands for the graphs' pool
    engine, gib = LLM(checkpoint_dir).engine, 1024**3
    fake_cuda_memory(monkeypatch, [0, 3 * gib, 5 * gib, 6 * gib])
    config = EngineConfig(checkpoint_dir, gpu_memory_utilization=0.5)
    budget = gpu_bytes_for_kv_cache(config, engine.model, torch.device("cpu"), engine.max_model_len,
                                    SdpaDecodeAttention, block_size=4)
    assert budget == 40 * gib - 10 * gib - 3 * gib - 1 * gib


def test_the_profiled_step_samples_max_num_seqs_rows_with_every_option(checkpoint_dir, monkeypatch):
    engine = LLM(checkpoint_dir).engine
    fake_cuda_memory(monkeypatch, [0, 0])
    calls, real = [], memory.Sampler.__call__

    def recording(self, logits, seqs):
        calls.append((logits.shape, seqs[0].params))
        return real(self, logits, seqs)
    monkeypatch.setattr(memory.Sampler, "__call__", recording)
    prompt_logprob_rows = []
    monkeypatch.setattr(memory, "logprob_table", lambda logits, ids, k: prompt_logprob_rows.append((len(logits), k)))
    gpu_bytes_for_kv_cache(EngineConfig(checkpoint_dir, max_num_seqs=40), engine.model, torch.device("cpu"),
                           engine.max_model_len)
    (shape, params), = calls
    assert shape == (40, 265)
    assert params.has_penalties and params.min_tokens and params.logprobs == 20
    assert 1 < params.top_k < 265 and params.top_p < 1 and params.min_p > 0
    assert prompt_logprob_rows == [(PROMPT_LOGPROBS_CHUNK, 20)]


def test_step_timing_is_opt_in_and_times_every_step(checkpoint_dir):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = LLM(checkpoint_dir)
    plain.generate([[1, 2, 3]], params, use_tqdm=False)
    assert plain.engine.stats.timed_steps == 0 and plain.engine.stats.host_ms_per_step is None
    timed = LLM(checkpoint_dir, step_timing=True)
    timed.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    stats = timed.engine.stats
    # on the CPU the device's time is the host's wall time inside the runner
    assert stats.timed_steps == stats.steps == 4
    assert stats.host_ms_per_step >= stats.device_ms_per_step > 0


def test_cpu_default_is_capped_by_the_ram_available_but_holds_one_sequence(checkpoint_dir, monkeypatch):
    per_block = 16 * BYTES_PER_TOKEN
    monkeypatch.setattr(memory, "available_ram", lambda: 2 * 20 * per_block)  # a half: 20 blocks
    assert LLM(checkpoint_dir, max_num_seqs=8, block_size=16).engine.kv_cache.num_blocks == 20
    monkeypatch.setattr(memory, "available_ram", lambda: 0)
    assert LLM(checkpoint_dir, max_num_seqs=8, block_size=16).engine.kv_cache.num_blocks == 64 // 16


def test_cpu_default_gives_a_large_model_half_the_ram_available(monkeypatch):
    # nanochat d20 in float32: 204,800 bytes a token, 256 sequences of 1,024 need 50 GiB
    per_block = 16 * 204_800
    monkeypatch.setattr(memory, "available_ram", lambda: 20 * 1024**3)
    assert memory.cpu_kv_blocks(256, 1024, 16, per_block) == 10 * 1024**3 // per_block


def test_cpu_default_logs_why_it_chose_its_size(checkpoint_dir, monkeypatch, caplog):
    monkeypatch.setattr(memory, "available_ram", lambda: 2 * 20 * 16 * BYTES_PER_TOKEN)
    with caplog.at_level(logging.INFO, logger="microvllm"):
        LLM(checkpoint_dir, max_num_seqs=8, block_size=16)
        LLM(checkpoint_dir, max_num_seqs=1, block_size=16)
    assert "50% of the" in caplog.text and "62% of what max_num_seqs=8 sequences" in caplog.text
    assert "room for max_num_seqs=1 sequences of max_model_len=64" in caplog.text


def cpu_kv_cache(*shape_and_dtype) -> PagedKVCache:
    """A KV cache built as a CPU engine builds it: the platform's pools, prewritten."""
    platform = platform_cpu.CpuPlatform(torch.device("cpu"))
    cache = PagedKVCache(*shape_and_dtype, "cpu", platform.kv_pool)
    platform.prewrite_kv((cache.k, cache.v), PagedKVCache.bytes_per_block(*shape_and_dtype[:1], *shape_and_dtype[2:]))
    return cache


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_a_cpu_kv_cache_takes_ram_only_for_the_blocks_written(monkeypatch):
    monkeypatch.setattr(platform_cpu, "PREWRITTEN_KV_BYTES", 8 * 1024**2)  # the first 32 blocks
    before = resident_bytes()
    cache = cpu_kv_cache(2, 4096, 16, 4, 64, torch.float32)  # 2 x 128 MiB
    cache.k[0, 4000] = 1.0  # one block of one layer: 16 KiB
    assert resident_bytes() - before < 8 * 1024**2 + 16 * 1024**2


def test_a_cpu_kv_cache_reads_as_zeros_where_never_written():
    cache = cpu_kv_cache(2, 64, 16, 4, 8, torch.bfloat16)
    cache.v[1, 3] = 1.0
    assert cache.k.abs().sum() == 0 and cache.v.sum() == 16 * 4 * 8
    assert cache.k.shape == cache.v.shape == (2, 65, 16, 4, 8) and cache.k.dtype == torch.bfloat16
