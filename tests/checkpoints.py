"""Tiny random nanochat checkpoints and tokenizers, written in nanochat's file format."""

import json
import pickle
from pathlib import Path

import tiktoken
import torch

from microvllm.model.config import ModelConfig
from microvllm.model.gpt import GPT
from microvllm.tokenizer import SPECIAL_TOKENS

SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                 r"|\s*[\r\n]|\s+(?!\S)|\s+")


def byte_tokenizer() -> tiktoken.Encoding:
    """256 single bytes, then nanochat's 9 special tokens: vocab 265."""
    ranks = {bytes([i]): i for i in range(256)}
    special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with every per-layer scalar away from its neutral value."""
    torch.manual_seed(seed)
    model = GPT(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("lambdas") or name.endswith("_lambda"):
            tensor = 0.5 + torch.rand_like(tensor)
        elif "ve_gate" in name or "smear_gate" in name:
            tensor = torch.randn_like(tensor)
        elif "wte" in name or "value_embeds" in name:
            tensor = torch.randn_like(tensor)
        else:
            tensor = torch.randn_like(tensor) / tensor.shape[-1] ** 0.5
        state[name] = tensor
    return state


def write_checkpoint(directory: Path, era: str = "E", step: int = 100, seq_len: int = 64,
                     n_layer: int = 4, n_head: int = 4, n_kv_head: int = 2, n_embd: int = 32,
                     window_pattern: str | None = "SL", seed: int = 0, tokenizer=True,
                     compiled_prefix: bool = False) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_config = dict(sequence_len=seq_len, vocab_size=265, n_layer=n_layer, n_head=n_head,
                        n_kv_head=n_kv_head, n_embd=n_embd)
    if window_pattern is not None:
        model_config["window_pattern"] = window_pattern
    config = ModelConfig(**model_config, era=era)
    state = random_state_dict(config, seed)
    if compiled_prefix:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    torch.save(state, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": model_config}))
    if tokenizer:
        (directory / "tokenizer").mkdir(exist_ok=True)
        with open(directory / "tokenizer" / "tokenizer.pkl", "wb") as f:
            pickle.dump(byte_tokenizer(), f)
    return directory
