"""StructuredOutput: a request's grammar (structured.grammars) as a request feature.

Each sequence has its own xgrammar matcher, its position in the grammar: the sampler
masks the sequence's logits with the tokens it allows, and the matcher accepts each
token as it is committed (so a recompute after preemption leaves it where it is).

Guesses (speculative decoding) are checked against the grammar before the step
(`check_guesses`): the matcher accepts the leading guesses it allows, the allowed tokens
after each of them are filled into a bitmask row, and the matcher is rolled back. The
grammar is never left anywhere a committed token did not take it, and each checked row
asks for the mask at its own depth (`logits_mask` of the sequence with the guesses
before it appended).
"""

from dataclasses import dataclass

import torch

from ..extras import import_xgrammar
from ..structured.grammars import new_matcher
from .request_feature import RequestFeature, TokenUpdate
from .sequence import Sequence


@dataclass
class MasksAhead:
    """The masks of a sequence's checked rows after its first guesses, for one step."""
    num_tokens: int                    # the sequence's tokens when its guesses were checked
    rows: list[torch.Tensor | None]    # after guess j + 1: its filled bitmask row, None once the grammar has ended


class StructuredOutput(RequestFeature):
    every_token = True

    def __init__(self, compiled_grammar):
        self.compiled_grammar = compiled_grammar  # xgrammar's CompiledGrammar
        self.matchers: dict = {}                  # Sequence -> its GrammarMatcher, made at first use
        self.masks_ahead: dict[Sequence, MasksAhead] = {}  # of sequences whose guesses this step checks

    def matcher(self, seq: Sequence):
        matcher = self.matchers.get(seq)
        if matcher is None:
            matcher = self.matchers[seq] = new_matcher(self.compiled_grammar)
        return matcher

    def logits_mask(self, seq: Sequence):
        ahead = self.masks_ahead.get(seq)
        if ahead is None or seq.num_tokens == ahead.num_tokens:
            return self.matcher(seq)
        return ahead.rows[seq.num_tokens - ahead.num_tokens - 1]

    def check_guesses(self, seq: Sequence, guesses: list[int]) -> int:
        # a guess the grammar refuses can never be sampled (its row is masked), nor can any after it
        matcher, vocab_size = self.matcher(seq), self.compiled_grammar.tokenizer_info.vocab_size
        bitmask = import_xgrammar().allocate_token_bitmask(len(guesses), vocab_size)
        rows: list[torch.Tensor | None] = []
        for token in guesses:
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
            if matcher.is_terminated():
                # after the stop token: the sequence has ended, the row is never emitted
                rows.append(None)
            else:
                matcher.fill_next_token_bitmask(bitmask, len(rows))
                rows.append(bitmask[len(rows)])
        matcher.rollback(len(rows))
        if rows:
            self.masks_ahead[seq] = MasksAhead(seq.num_tokens, rows)
        else:
            self.masks_ahead.pop(seq, None)
        return len(rows)

    def commit(self, seq: Sequence, update: TokenUpdate) -> None:
        self.masks_ahead.pop(seq, None)
        if not self.matcher(seq).accept_token(seq.token_ids[-1]):
            # only where allowed_token_ids, bad_words, a logits processor or min_tokens
            # left the grammar no token: the output cannot go on as its grammar says
            update.finish = ("abort", None)
