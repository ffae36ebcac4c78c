"""NgramProposer: prompt lookup, guesses read off the sequence's own earlier tokens.

Where a text quotes, repeats or edits what came before (a passage and its summary,
code being rewritten), the tokens after the sequence's last few tokens have often
already appeared after the same few tokens earlier on. The proposer finds the longest
suffix n-gram (n from prompt_lookup_max down to prompt_lookup_min) that occurred
before, and guesses the tokens that followed its most recent earlier occurrence.

Each sequence keeps an index of its n-grams (NgramIndex), extended by the tokens it
gained since the last step, so a lookup costs a few dict reads however long the
sequence is.
"""

from ..engine.sequence import Sequence
from .proposer import Proposer


class NgramIndex:
    """Where each n-gram of a token list (min_n <= n <= max_n) last ended, for a list
    that only ever grows at its end."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> the index after its latest occurrence
        self.num_indexed = 0  # n-grams ending before this index are in `follower`

    def guesses(self, tokens: list[int], num_guesses: int) -> list[int]:
        """At most `num_guesses` tokens that followed the most recent earlier occurrence
        of the longest suffix n-gram of `tokens`; [] if none occurred before."""
        last = len(tokens) - 1
        min_n, max_n, follower = self.min_n, self.max_n, self.follower
        # the suffix itself (ending at `last`) stays out until a later token follows it
        for end in range(self.num_indexed, last):
            for n in range(min_n, min(max_n, end + 1) + 1):
                follower[tuple(tokens[end + 1 - n:end + 1])] = end + 1
        self.num_indexed = max(self.num_indexed, last)
        for n in range(min(max_n, last), min_n - 1, -1):
            start = follower.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + num_guesses]
        return []


class NgramProposer(Proposer):
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self.indexes: dict[Sequence, NgramIndex] = {}

    def propose(self, seqs: list[Sequence], num_guesses: list[int]) -> list[list[int]]:
        indexes, guesses = self.indexes, []
        for seq, num in zip(seqs, num_guesses):
            index = indexes.get(seq)
            if index is None:
                index = indexes[seq] = NgramIndex(self.min_n, self.max_n)
            guesses.append(index.guesses(seq.token_ids, num))
        return guesses

    def release(self, seq: Sequence) -> None:
        self.indexes.pop(seq, None)
