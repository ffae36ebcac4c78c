"""Random-weight nanochat checkpoints of any shape and era, in nanochat's file format.

A checkpoint dir gets `model_{step:06d}.pt`, `meta_{step:06d}.json` and
`tokenizer/tokenizer.pkl` (the first place `LLM` looks). The weights are drawn tensor
by tensor straight into the stored dtype, from shapes read off a model built on the
meta device, so a 560M-parameter d20 costs its bfloat16 size once in memory rather than
an fp32 model plus a copy. The tokenizer is a tiktoken Encoding of any vocab size that
ends with nanochat's special tokens, as the real one does.
"""

import itertools
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
NUM_BYTES = 256
MIN_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = MIN_VOCAB_SIZE + NUM_BYTES**2   # every two-byte pair merged


def tokenizer_with_vocab(vocab_size: int) -> tiktoken.Encoding:
    """Single bytes, then two-byte merges, then nanochat's 9 special tokens: `vocab_size` ids.

    Each merge joins two single bytes, so its parts always rank below it, which BPE
    needs to reach it. At the minimum size, 265, there are no merges at all.
    """
    num_merges = vocab_size - MIN_VOCAB_SIZE
    if not 0 <= num_merges <= NUM_BYTES**2:
        raise ValueError(f"vocab_size={vocab_size} must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]: "
                         f"256 bytes, up to {NUM_BYTES**2} two-byte merges, {len(SPECIAL_TOKENS)} special tokens")
    ranks = {bytes([b]): b for b in range(NUM_BYTES)}
    pairs = itertools.islice(itertools.product(range(NUM_BYTES), repeat=2), num_merges)
    ranks.update({bytes(pair): NUM_BYTES + i for i, pair in enumerate(pairs)})
    first_special = NUM_BYTES + num_merges  # nanochat puts its special tokens last
    special = {token: first_special + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f"random-{vocab_size}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def random_state_dict(config: ModelConfig, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with every per-layer scalar and gate away from its neutral value.

    Matrices are scaled by 1/sqrt(fan_in) so activations stay O(1) through the layers;
    lambdas in [0.5, 1.5) and unit-normal gates make each era's extras visibly matter.
    """
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in GPT(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("lambdas") or name.endswith("_lambda"):
            state[name] = 0.5 + torch.rand(shape, generator=generator, dtype=dtype)
            continue
        tensor = torch.randn(shape, generator=generator, dtype=dtype)
        if not any(part in name for part in ("wte", "value_embeds", "ve_gate", "smear_gate")):
            tensor /= shape[-1] ** 0.5
        state[name] = tensor
    return state


def save_checkpoint(directory: str | Path, step: int, model_config: dict,
                    state_dict: dict[str, torch.Tensor], tokenizer: tiktoken.Encoding | None) -> Path:
    """Write one nanochat checkpoint; the meta file goes last, so its presence means complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        (directory / "tokenizer").mkdir(exist_ok=True)
        with open(directory / "tokenizer" / "tokenizer.pkl", "wb") as f:
            pickle.dump(tokenizer, f)
    torch.save(state_dict, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": model_config}))
    return directory
