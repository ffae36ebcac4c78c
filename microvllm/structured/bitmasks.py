"""GrammarBitmasks: the sampler's structured-outputs step, the grammar's allowed tokens per row.

A step with constrained sequences fills one bit per token for those rows only (in
xgrammar's threads, all rows in one call), copies the bitmask to the logits' device
and sets every disallowed logit to -inf in one batched operation; the other rows are
never touched. The sampler calls it only in steps that hold a constrained sequence.
"""

import torch

from ..extras import import_xgrammar


class GrammarBitmasks:
    def __init__(self):
        self._bitmask: torch.Tensor | None = None  # int32 [rows, ceil(vocab / 32)], reused across steps
        self._batch = None                          # xgrammar's BatchGrammarMatcher, made at first use

    def apply(self, logits: torch.Tensor, matchers: list) -> torch.Tensor:
        """`logits` (changed in place) with each constrained row's disallowed tokens at -inf;
        `matchers` holds each row's GrammarMatcher, or None for an unconstrained row."""
        xgr = import_xgrammar()
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        bitmask = self._buffer(len(matchers), logits.shape[1], xgr)
        self._batch.batch_fill_next_token_bitmask([matchers[r] for r in rows], bitmask, indices=rows)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=logits.shape[1], indices=rows)
        return logits

    def _buffer(self, num_rows: int, vocab_size: int, xgr) -> torch.Tensor:
        if self._bitmask is None or len(self._bitmask) < num_rows:
            self._bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)
            self._batch = self._batch or xgr.BatchGrammarMatcher()
        return self._bitmask
