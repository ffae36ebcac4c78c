"""NgramProposer: prompt lookup, guesses read off the sequence's own earlier tokens.

Where a text quotes, repeats or edits what came before (a passage and its summary,
code being rewritten), the tokens after the sequence's last few tokens have often
already appeared after the same few tokens earlier on. The proposer finds the longest
suffix n-gram (n from prompt_lookup_max down to prompt_lookup_min) that occurred
before, and guesses the tokens that followed its most recent earlier occurrence.
It keeps nothing between steps: each lookup is a numpy scan of the sequence's tokens.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..engine.sequence import Sequence
from .proposer import Proposer


def lookup(tokens: np.ndarray, min_n: int, max_n: int, num_guesses: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram of `tokens` (min_n <= n <= max_n), at most `num_guesses`; [] if none occurred."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # starts i < length - n: the occurrence ends before the suffix itself does
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + num_guesses].tolist()
    return []


class NgramProposer(Proposer):
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, seqs: list[Sequence], num_guesses: list[int]) -> list[list[int]]:
        return [lookup(np.fromiter(seq.token_ids, dtype=np.int64, count=len(seq.token_ids)),
                       self.min_n, self.max_n, k)
                for seq, k in zip(seqs, num_guesses)]
