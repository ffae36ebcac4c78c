"""Tiny random nanochat checkpoints and tokenizers, written in nanochat's file format
(and read back for the reference forward).

The writing is benchmarks.random_checkpoint's; this file picks the tests' defaults: a
265-token byte tokenizer and a 4-layer era-E model with sequence_len 64.
"""

import json
from pathlib import Path

import tiktoken
import torch

from benchmarks.random_checkpoint import MIN_VOCAB_SIZE, random_state_dict, save_checkpoint, tokenizer_with_vocab
from microvllm.model.config import ModelConfig


def byte_tokenizer() -> tiktoken.Encoding:
    """256 single bytes, then nanochat's 9 special tokens: vocab 265."""
    return tokenizer_with_vocab(MIN_VOCAB_SIZE)


def write_checkpoint(directory: Path, era: str = "E", step: int = 100, seq_len: int = 64,
                     n_layer: int = 4, n_head: int = 4, n_kv_head: int = 2, n_embd: int = 32,
                     window_pattern: str | None = "SL", seed: int = 0, tokenizer=True,
                     compiled_prefix: bool = False) -> Path:
    model_config = dict(sequence_len=seq_len, vocab_size=MIN_VOCAB_SIZE, n_layer=n_layer, n_head=n_head,
                        n_kv_head=n_kv_head, n_embd=n_embd)
    if window_pattern is not None:
        model_config["window_pattern"] = window_pattern
    state = random_state_dict(ModelConfig(**model_config, era=era), seed)
    if compiled_prefix:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    return save_checkpoint(directory, step, model_config, state, byte_tokenizer() if tokenizer else None)


def load_reference(directory):
    """(state dict, model_config) of the checkpoint in directory, for reference.py's forwards."""
    sd = torch.load(next(directory.glob("model_*.pt")), weights_only=True)
    cfg = json.loads(next(directory.glob("meta_*.json")).read_text())["model_config"]
    return sd, cfg
