"""Request and Sequence: the engine's record of what was asked and how far it has got.

A Request is one prompt with its SamplingParams; it owns `n` Sequences, one per sample.
A Sequence's tokens are its prompt followed by what it generated; `num_computed_tokens`
of them have their KV in the cache (the rest are computed by coming steps).
"""

import enum
import itertools
import time
from array import array
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams
from ..validation import check_type


def block_table_of(block_ids=()) -> array:
    """A sequence's block table: its block ids as C int64s, so that a step can join the
    tables of hundreds of sequences as raw bytes instead of reading Python ints."""
    return array("q", block_ids)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int                          # which of the request's n samples
    token_ids: list[int]
    seed: int                           # the sampling noise is a pure function of this
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1         # prefix reused at first admission; -1 = not admitted yet
    block_table: array = field(default_factory=block_table_of)  # see block_table_of
    block_hashes: list[int] = field(default_factory=list)  # of full blocks, chained, as computed
    num_registered_blocks: int = 0      # leading full blocks already offered to the prefix cache
    logprobs: list[dict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None    # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    text: str = ""
    # output index ranges [start, end) of tokens a tool forced
    forced_spans: list[tuple[int, int]] = field(default_factory=list)
    num_streamed_tokens: int = 0        # of the output, sent by a DELTA stream so far
    num_streamed_chars: int = 0
    # a DELTA stream's leading output tokens whose text ends on a whole character and has
    # all been sent, and that text's length: each step decodes only the tokens after them
    num_settled_tokens: int = 0
    num_settled_chars: int = 0
    # where the request has structured_outputs: an xgrammar GrammarMatcher that has
    # accepted every output token so far (advanced as tokens are committed, so a
    # recompute after preemption leaves it where it is)
    grammar: object = None
    params: SamplingParams = field(init=False, repr=False)  # the request's; read on every step

    def __post_init__(self):
        self.params = self.request.params
        self.num_prompt_tokens = len(self.token_ids)
        if self.request.params.logprobs is not None:
            self.logprobs, self.cumulative_logprob = [], 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_is_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def output_token_masks(self, start: int = 0) -> list[int]:
        """1 for each output token from `start` on that was sampled, 0 for one a tool forced."""
        masks = [1] * (self.num_output_tokens - start)
        for span_start, span_end in self.forced_spans:
            if span_end > start:
                span_start = max(span_start, start)
                masks[span_start - start:span_end - start] = [0] * (span_end - span_start)
        return masks


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finished_time: float | None = None
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict | None] | None = None
    bad_word_ids: list[tuple[int, ...]] = field(default_factory=list)  # see logits_processors.py
    output_kind: object = None          # a RequestOutputKind: what step() reports as it runs
    tool_calls: object = None           # a tools.ToolCalls where the request uses tools
    # kept by the output processor, so that asking whether the request is done, once per
    # finished sample, costs O(1) and not O(n)
    num_finished_sequences: int = 0

    @property
    def is_finished(self) -> bool:
        return self.num_finished_sequences == len(self.sequences)


class RequestIds:
    """Hands out request ids: the one a caller gives, if no unfinished request holds it,
    else the next of a counter that no unfinished request holds."""

    def __init__(self):
        self._counter = itertools.count()

    def take(self, request_id: str | int | None, in_use) -> str:
        if request_id is None:
            request_id = str(next(self._counter))
            while request_id in in_use:  # skip ids a user gave by hand
                request_id = str(next(self._counter))
        else:
            request_id = str(check_type("request_id", request_id, (str, int), "a str"))
        if request_id in in_use:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return request_id
