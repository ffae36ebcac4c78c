"""StructuredOutput: a request's grammar (structured.grammars) as a request feature.

Each sequence has its own xgrammar matcher, its position in the grammar: the sampler
masks the sequence's logits with the tokens it allows, and the matcher accepts each
token as it is committed (so a recompute after preemption leaves it where it is).
"""

from ..structured.grammars import new_matcher
from .request_feature import RequestFeature, TokenUpdate
from .sequence import Sequence


class StructuredOutput(RequestFeature):
    every_token = True

    def __init__(self, compiled_grammar):
        self.compiled_grammar = compiled_grammar  # xgrammar's CompiledGrammar
        self.matchers: dict = {}                  # Sequence -> its GrammarMatcher, made at first use

    def logits_mask(self, seq: Sequence):
        matcher = self.matchers.get(seq)
        if matcher is None:
            matcher = self.matchers[seq] = new_matcher(self.compiled_grammar)
        return matcher

    def commit(self, seq: Sequence, update: TokenUpdate) -> None:
        if not self.logits_mask(seq).accept_token(seq.token_ids[-1]):
            # only where allowed_token_ids, bad_words, a logits processor or min_tokens
            # left the grammar no token: the output cannot go on as its grammar says
            update.finish = ("abort", None)
