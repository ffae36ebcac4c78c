"""SequenceForks: one engine's Forks (interface.py), what beam search drives.

A fork starts from its parent's computed KV where the scheduler has room: full blocks
shared, the partial last one copied. The copies of all forks made between two steps
run as one batched copy when the next step begins (`copy_forked_blocks`), before any
forward writes into those blocks.
"""

import itertools

from ..outputs import Logprob
from .interface import Forks
from .kv_cache import PagedKVCache
from .output_processor import OutputProcessor
from .scheduler import Scheduler
from .sequence import Sequence


class SequenceForks(Forks):
    def __init__(self, scheduler: Scheduler, output_processor: OutputProcessor, kv_cache: PagedKVCache,
                 seq_ids: itertools.count):
        self.scheduler = scheduler
        self.output_processor = output_processor
        self.kv_cache = kv_cache
        self.seq_ids = seq_ids      # the engine's: a fork's id is unique among all sequences
        self.pending_copies: list[tuple[int, int]] = []  # (source, destination) blocks

    def sequences(self, request_id: str) -> list[Sequence]:
        return list(self.output_processor.requests[request_id].sequences)

    def take_back_last_token(self, seq: Sequence) -> dict[int, Logprob]:
        seq.token_ids.pop()
        return seq.logprobs.pop()

    def append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)

    def fork(self, request_id: str, token_ids: list[int], parent: Sequence | None, seed: int) -> Sequence:
        """Where the scheduler has no room for it beside `parent` (or there is none), the
        new sequence is queued and recomputed, mostly from the prefix cache. Its output
        positions count from the request's prompt."""
        request = self.output_processor.requests[request_id]
        seq = Sequence(next(self.seq_ids), request, len(request.sequences), list(token_ids), seed)
        seq.num_prompt_tokens = len(request.prompt_token_ids)  # the sampling noise is keyed by output positions
        request.sequences.append(seq)
        if parent is not None and self.scheduler.can_fork(parent):
            copy = self.scheduler.fork(parent, seq)
            if copy is not None:
                self.pending_copies.append(copy)
        else:
            self.scheduler.add(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq, "abort")
        seq.request.sequences.remove(seq)

    def copy_forked_blocks(self) -> None:
        if self.pending_copies:
            self.kv_cache.copy_blocks(*zip(*self.pending_copies))
            self.pending_copies = []
