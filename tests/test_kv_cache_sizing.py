"""The KV cache gets the number of blocks that the settings ask for, and says so."""

import logging

from microvllm import LLM
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
