"""Scheduler: decides, every step, which tokens of which sequences run (continuous batching).

One step runs a single forward over: one decode token of each running sequence, the
next chunk of any unfinished prompt, and prefill chunks of newly admitted sequences,
together no more than `max_num_batched_tokens` tokens and `max_num_seqs` sequences.
Running sequences go first, in admission order. When one needs a block and none is
free, the most recently admitted running sequence is preempted: its blocks are freed
and it returns to the front of the waiting queue with all its tokens, to be recomputed
(usually from the prefix cache) when it is admitted again.
"""

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    # tokens guessed to follow the sequence's own (a proposer's, speculative/): the step
    # runs them after its new tokens and samples at each, to check them
    guesses: list[int] | tuple[()] = ()

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so it yields a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.admitted_prompt_tokens = 0   # at first admission, over all sequences
        self.cached_prompt_tokens = 0     # of those, reused from the cache or a sibling

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        num_preemptions = self.num_preemptions
        block_size, running = self.block_manager.block_size, self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = len(seq.token_ids) - seq.num_computed_tokens
            num_new = num_new if num_new <= budget else budget
            # most decodes stay inside their last block: only the others need block work
            if (seq.num_computed_tokens + num_new > len(seq.block_table) * block_size
                    and not self._append_slots(seq, num_new)):
                break  # seq itself was preempted: it was the last one running
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1
        preempted = self.num_preemptions > num_preemptions
        # a step that had to preempt has no room to admit anyone
        deferred = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self._shared_prefix(seq)
            if prefix is None:  # it waits for KV another sequence is computing: admit the next
                deferred.append(self.waiting.popleft())
                continue
            num_new = min(seq.num_tokens - len(prefix) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(seq, prefix, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, prefix, num_new)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = seq.num_computed_tokens
                self.admitted_prompt_tokens += seq.num_prompt_tokens
                self.cached_prompt_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))
        return scheduled

    def _append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Reserve the blocks `seq` needs, preempting from the most recently admitted
        running sequence until they are free; False when that had to be `seq` itself."""
        while not self.block_manager.append_slots(seq, num_new_tokens):
            victim = self.running[-1]  # never one scheduled this step: those come before seq
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _shared_prefix(self, seq: Sequence) -> list[int] | None:
        """Blocks `seq` can start from: its first sibling's prompt blocks, or cached ones;
        None while it waits for them to be computed."""
        first = seq.request.sequences[0]
        if first is seq or seq.num_output_tokens or first.status is not SequenceStatus.RUNNING:
            return self.block_manager.cached_prefix(seq)
        if not first.prompt_is_computed:
            return None
        # the n samples of a request share their prompt's full blocks, caching or not
        shareable = (seq.num_prompt_tokens - 1) // self.block_manager.block_size
        return first.block_table[:shareable]

    def can_fork(self, parent: Sequence) -> bool:
        return len(self.running) < self.max_num_seqs and self.block_manager.can_fork(parent)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Start `child` running from `parent`'s computed KV; returns a block to copy, if any.

        The child joins the running sequences last, as if just admitted (so it is the first
        to be preempted); it was never waiting, so the admission counters leave it out.
        """
        copy = self.block_manager.fork(parent, child)
        child.num_cached_tokens = child.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        return copy

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, scheduled: list[ScheduledSequence]) -> None:
        """Account for a finished forward: KV of the scheduled tokens is now in the cache."""
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        self.block_manager.register_computed_blocks([item.seq for item in scheduled])

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Take `seq` out of the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
