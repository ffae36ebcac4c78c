"""SequenceAhead: a sequence as it would be after some guessed tokens, for one checked row.

A step that checks `g` guesses of a sequence samples `1 + g` rows of it; row j must be
sampled, and its token decided, exactly as a plain step would once the first j guesses
had been emitted. Each row therefore gets a read-only view of the sequence with those
j tokens appended, exposing what the sampler, the logits shaping, the stop rules and
the request features read (params, seed, request, token ids and their counts, wake
tokens). A view hashes and compares as its sequence, so features that keep state by
sequence find the sequence's own.
"""

from ..engine.sequence import Sequence


class SequenceAhead:
    __slots__ = ("seq", "params", "seed", "request", "wake_tokens", "num_prompt_tokens", "num_tokens", "ahead",
                 "_token_ids")

    def __init__(self, seq: Sequence, ahead: list[int]):
        self.seq = seq
        self.params, self.seed, self.request = seq.params, seq.seed, seq.request
        self.wake_tokens, self.num_prompt_tokens = seq.wake_tokens, seq.num_prompt_tokens
        self.num_tokens = len(seq.token_ids) + len(ahead)
        self.ahead = ahead
        self._token_ids = None

    @property
    def token_ids(self) -> list[int]:
        # built on first use: most steps read only the counts, and a long sequence's copy is not free
        if self._token_ids is None:
            self._token_ids = self.seq.token_ids + self.ahead
        return self._token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def __hash__(self) -> int:
        return hash(self.seq)

    def __eq__(self, other) -> bool:
        return other is self.seq or (isinstance(other, SequenceAhead) and other.seq is self.seq)


def rows_ahead(seq: Sequence, guesses: list[int]) -> list[Sequence | SequenceAhead]:
    """The views of a sequence's checked rows: itself, then after each of its guesses."""
    return [seq, *(SequenceAhead(seq, guesses[:j]) for j in range(1, len(guesses) + 1))]
