"""Proposer: what guesses the next tokens of decoding sequences.

A proposer (n-gram prompt lookup, a draft model) only guesses; the target model checks
every guess in the step's flat batch, and a guess is kept exactly when it equals the
token the target samples at that position. A wrong guess therefore costs compute, never
a different output, and a proposer may return fewer guesses than asked, or none.
"""

from ..engine.sequence import Sequence


class Proposer:
    def propose(self, seqs: list[Sequence], num_guesses: list[int]) -> list[list[int]]:
        """Per sequence, at most num_guesses[i] tokens guessed to follow seqs[i].token_ids
        (every token of which is final: the sampled ones the step before appended).

        The engine asks only for running sequences about to decode their last token; a
        sequence's tokens only ever grow at the end (by 1 + the accepted guesses per
        step) until `release`. Fewer guesses than asked, or none, are fine."""
        raise NotImplementedError

    def release(self, seq: Sequence) -> None:
        """Forget whatever the proposer keeps for `seq`, which has finished, was aborted or
        was preempted (it may be asked about again once readmitted, from scratch). Called
        within a few steps of that, not necessarily at once."""
