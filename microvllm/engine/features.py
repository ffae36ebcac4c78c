"""RequestFeatures: a request's features in one list, and what the hot path asks of them.

`request_features` builds the list from a request's SamplingParams when it is added
(compiling its grammar then, so the step loop never waits on it); a request without
features gets None, and the sampler and output processor pass it by with one check.
Which features a sampled token wakes, and which hooks each feature overrides, is
worked out here once per request, so that a step calls only hooks that do something.
"""

from ..sampling_params import RequestOutputKind, SamplingParams
from ..structured.grammars import Grammars
from ..tokenizer import Tokenizer
from ..tools import ToolCalls
from .logprobs import SampledLogprobs
from .request_feature import RequestFeature
from .sequence import Sequence
from .stop_strings import StopStrings
from .stream_deltas import StreamDeltas
from .structured_output import StructuredOutput
from .tool_use import ToolUse


def _overriding(items: list[RequestFeature], hook: str) -> list[RequestFeature]:
    return [f for f in items if getattr(type(f), hook) is not getattr(RequestFeature, hook)]


class EveryToken:
    """The wake tokens of features that every token wakes."""

    def __contains__(self, token: int) -> bool:
        return True


EVERY_TOKEN = EveryToken()
# one object per distinct set: every row reads its set, and shared ones stay in cache
_wake_token_sets: dict[frozenset[int], frozenset[int]] = {}


class RequestFeatures:
    def __init__(self, items: list[RequestFeature]):
        self.items = items
        # the sampled tokens that wake the features (Sequence.wake_tokens): one membership test per row
        if any(f.every_token for f in items):
            self.wake_tokens = EVERY_TOKEN
        else:
            tokens = frozenset(f.wake_token for f in items if f.wake_token is not None)
            self.wake_tokens = _wake_token_sets.setdefault(tokens, tokens)
        self.watches_text = any(f.watches_text for f in items)
        self.forcing = _overriding(items, "forced_tokens")
        self.guessing = _overriding(items, "check_guesses")
        self.stopping = _overriding(items, "stop")
        self.deciding = _overriding(items, "on_token")
        self.committing = _overriding(items, "commit")
        self.stream = next((f for f in items if isinstance(f, StreamDeltas)), None)

    def logits_mask(self, seq: Sequence):
        return next((m for f in self.items if (m := f.logits_mask(seq)) is not None), None)

    def check_guesses(self, seq: Sequence, guesses: list[int]) -> list[int]:
        """The leading `guesses` every feature lets the step check."""
        for feature in self.guessing:
            guesses = guesses[:feature.check_guesses(seq, guesses)]
        return guesses

    def output_text(self, seq: Sequence) -> str | None:
        return next((t for f in self.items if (t := f.output_text(seq)) is not None), None)

    def output_masks(self, seq: Sequence, start: int) -> list[int] | None:
        return next((m for f in self.items if (m := f.output_masks(seq, start)) is not None), None)


def request_features(params: SamplingParams, output_kind: RequestOutputKind, tokenizer: Tokenizer,
                     grammars: Grammars) -> RequestFeatures | None:
    items: list[RequestFeature] = []
    tools = ToolCalls.for_request(params.tools, tokenizer)
    if tools is not None:
        items.append(ToolUse(tools, tokenizer))
    if params.structured_outputs is not None:
        items.append(StructuredOutput(grammars.compiled(params.structured_outputs.key)))  # compiled once, then cached
    if params.stop_strings:
        items.append(StopStrings())
    if params.logprobs is not None:
        items.append(SampledLogprobs(tokenizer))
    if output_kind is RequestOutputKind.DELTA:
        items.append(StreamDeltas())
    return RequestFeatures(items) if items else None


def logits_masks(seqs: list[Sequence]) -> list:
    """Each row's grammar mask (see RequestFeature.logits_mask), or None."""
    return [None if (f := seq.request.features) is None else f.logits_mask(seq) for seq in seqs]
