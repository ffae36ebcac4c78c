"""ToolUse: a request's tools (tools.ToolCalls) as a request feature.

Sampling `<|python_end|>` wakes it: it asks the tool for the answer to the call just
closed, which the output processor forces after the sampled token (cut to what the
length limits leave). It remembers where forced tokens sit in each output, so that
outputs can mark them (CompletionOutput's masks: 0 for forced, 1 for sampled).
"""

from ..tokenizer import Tokenizer
from ..tools import ToolCalls
from .request_feature import RequestFeature, TokenUpdate
from .sequence import Sequence


class ToolUse(RequestFeature):
    def __init__(self, calls: ToolCalls, tokenizer: Tokenizer):
        self.calls = calls
        self.tokenizer = tokenizer
        self.wake_token = calls.python_end
        # per sequence, the output index ranges [start, end) of tokens a tool forced
        self.forced_spans: dict[Sequence, list[tuple[int, int]]] = {}

    def forced_tokens(self, seq: Sequence, token: int) -> list[int]:
        if token != self.wake_token:  # woken by another feature of the request
            return []
        return self.calls.forced_tokens(seq.output_token_ids + [token], self.tokenizer)

    def commit(self, seq: Sequence, update: TokenUpdate) -> None:
        if update.forced:
            start = seq.num_output_tokens
            self.forced_spans.setdefault(seq, []).append((start, start + len(update.forced)))

    def output_masks(self, seq: Sequence, start: int) -> list[int] | None:
        spans = self.forced_spans.get(seq)
        if not spans:
            return None
        masks = [1] * (seq.num_output_tokens - start)
        for span_start, span_end in spans:
            if span_end > start:
                span_start = max(span_start, start)
                masks[span_start - start:span_end - start] = [0] * (span_end - span_start)
        return masks
