"""GrammarBitmasks: the sampler's structured-outputs step, the grammar's allowed tokens per row.

A step with constrained sequences fills one bit per token for those rows only (in
xgrammar's threads, all rows in one call), copies the bitmask to the logits' device
and sets every disallowed logit to -inf in one batched operation; the other rows are
never touched. The sampler calls it only in steps that hold a constrained sequence.
A row after checked guesses (speculative decoding) comes with its bitmask row filled
already, from its matcher as it was after those guesses; it is copied in.
"""

import torch

from ..extras import import_xgrammar


class GrammarBitmasks:
    def __init__(self):
        self._bitmask: torch.Tensor | None = None  # int32 [rows, ceil(vocab / 32)], reused across steps
        self._batch = None                          # xgrammar's BatchGrammarMatcher, made at first use

    def apply(self, logits: torch.Tensor, masks: list) -> torch.Tensor:
        """`logits` (changed in place) with each constrained row's disallowed tokens at -inf;
        `masks` holds each row's GrammarMatcher, its filled bitmask row (a tensor), or None
        for an unconstrained row."""
        xgr = import_xgrammar()
        rows = [row for row, mask in enumerate(masks) if mask is not None]
        filled = [row for row in rows if isinstance(masks[row], torch.Tensor)]
        matched = [row for row in rows if not isinstance(masks[row], torch.Tensor)] if filled else rows
        bitmask = self._buffer(len(masks), logits.shape[1], xgr)
        if matched:
            self._batch.batch_fill_next_token_bitmask([masks[r] for r in matched], bitmask, indices=matched)
        if filled:
            bitmask[filled] = torch.stack([masks[r] for r in filled])
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=logits.shape[1], indices=rows)
        return logits

    def _buffer(self, num_rows: int, vocab_size: int, xgr) -> torch.Tensor:
        if self._bitmask is None or len(self._bitmask) < num_rows:
            self._bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)
            self._batch = self._batch or xgr.BatchGrammarMatcher()
        return self._bitmask
