"""Engine: the one interface its drivers use (the LLM facade, beam search, the server's
engine process, the nanochat adapter), implemented by one LLMEngine and by a Ray
ReplicaPool of them.

Requests go in checked (prompts.checked_prompt), outputs come out of `step`. What only
one engine can do is a capability the driver asks about, never a type it tests:
`streams` (outputs before a request finishes) and `forks` (beam search's hold on a
request's sequences, None where they cannot be forked).
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from ..outputs import Logprob, RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from ..tokenizer import Tokenizer
from .sequence import Sequence
from .stats import EngineStats


class Forks(ABC):
    """A request's sequences by hand, for beam search: it takes the sampled token back,
    gives a sequence its next token, forks one from another and releases one."""

    @abstractmethod
    def sequences(self, request_id: str) -> list[Sequence]:
        """The live sequences of an unfinished request."""

    @abstractmethod
    def take_back_last_token(self, seq: Sequence) -> dict[int, Logprob]:
        """Remove the token `seq` sampled last; returns the candidates it was sampled from."""

    @abstractmethod
    def append_token(self, seq: Sequence, token: int) -> None:
        """Give `seq` its next token: it is computed, and the one after sampled, next step."""

    @abstractmethod
    def fork(self, request_id: str, token_ids: list[int], parent: Sequence | None, seed: int) -> Sequence:
        """A new sequence of the request holding `token_ids`, starting from `parent`'s KV."""

    @abstractmethod
    def release(self, seq: Sequence) -> None:
        """Drop one sequence of a request and free its blocks; the request carries on."""


class Engine(ABC):
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    stats: EngineStats      # counters and the load after the last step
    streams: bool           # whether step() returns a request's outputs before it finishes
    forks: Forks | None     # None: sequences live where no driver can reach them
    speculates = False      # whether a step may emit several tokens of a sequence (speculative_config)

    @abstractmethod
    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None,
                    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY) -> str:
        """Queue a checked request; returns its id (`request_id`, or a fresh one)."""

    @abstractmethod
    def step(self) -> list[RequestOutput]:
        """Run the queued work a step further; the outputs due (finished, or streamed)."""

    @abstractmethod
    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks; its final output where one is at hand."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to return."""

    @abstractmethod
    def num_unfinished_requests(self) -> int:
        """Requests added and neither finished nor aborted."""

    @abstractmethod
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new weights in place (no request may be unfinished); resets the prefix cache."""

    @abstractmethod
    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; True when done."""
