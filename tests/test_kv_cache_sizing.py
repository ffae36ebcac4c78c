"""The KV cache gets the number of blocks that the settings ask for, and says so."""

import logging

import torch

from microvllm import LLM
from microvllm.engine.config import EngineConfig
from microvllm.engine.memory import gpu_bytes_for_kv_cache
from microvllm.model.attention import AttentionBackend

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


def test_cpu_default_is_capped_by_the_ram_available_but_holds_one_sequence(checkpoint_dir, monkeypatch):
    from microvllm.engine import memory
    per_block = 16 * BYTES_PER_TOKEN
    monkeypatch.setattr(memory, "available_ram", lambda: 4 * 20 * per_block)  # a quarter: 20 blocks
    assert LLM(checkpoint_dir, max_num_seqs=8, block_size=16).engine.kv_cache.num_blocks == 20
    monkeypatch.setattr(memory, "available_ram", lambda: 0)
    assert LLM(checkpoint_dir, max_num_seqs=8, block_size=16).engine.kv_cache.num_blocks == 64 // 16
