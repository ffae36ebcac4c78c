"""What generate() returns, with vLLM's field names."""

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int                 # 1 = the most likely token
    decoded_token: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None   # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or string; None for EOS
    # per token: 1 sampled, 0 forced by a tool (nanochat's masks)
    token_masks: list[int] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    def __getitem__(self, key: str):
        """Dict-style access to the first completion, as simpler engines return it."""
        if key == "text":
            return self.outputs[0].text
        if key == "token_ids":
            return self.outputs[0].token_ids
        raise KeyError(f"{key!r}: dict-style access offers 'text' and 'token_ids'")


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's first, as in vLLM), their text and log-probs."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]]  # per generated token: the candidates it was chosen from
    cum_logprob: float = 0.0
    text: str | None = None             # tokens decoded, prompt and special tokens included
    finish_reason: str | None = None    # "stop" (EOS) | "length"
    stop_reason: int | None = None      # the EOS token id


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first: at most beam_width of them."""
    sequences: list[BeamSearchSequence]
