"""make_proposer: the proposer a SpeculativeConfig asks for, built beside an engine.

Apart from config.py, which the engine's own config imports to check the setting: the
draft proposer builds engine parts, so importing it from there would be a cycle.
"""

import torch

from ..platform import Platform
from ..tokenizer import Tokenizer
from .config import SpeculativeConfig
from .draft import DraftProposer
from .ngram import NgramProposer
from .proposer import Proposer


def make_proposer(config: SpeculativeConfig, target_tokenizer: Tokenizer, dtype: torch.dtype,
                  device: torch.device, platform: Platform) -> Proposer:
    """The proposer `config` asks for, built beside an engine with these parts."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    return DraftProposer(config.model, config.num_speculative_tokens, target_tokenizer, dtype, device, platform)
