"""Speculator: the engine's side of speculative decoding, between schedule() and the forward.

After the scheduler has chosen a step, `add_guesses` asks the proposer for guesses for
the step's pure decodes (a running sequence computing its one last token), within what
the step's token budget leaves, never past max_tokens or max_model_len, and reserves
their KV slots from free blocks only: a guess never preempts anyone, and a sequence that
cannot get the blocks simply goes without guesses this step. The model runner checks
the guesses in the same forward, the output processor keeps the ones the model agrees
with, and `settle` counts the accepted ones as computed (registering only their full
blocks with the prefix cache) and gives back the blocks that rejected ones needed.

Each sequence paces its guesses by how they fare (GuessPace): all accepted, it asks for
more next time; some, one more than were accepted; none, a single guess next time, and
after further misses in a row (or lookups that found nothing) it stops guessing for
ever longer (up to MAX_WAIT_STEPS) before trying again, so text the proposer cannot
predict costs next to nothing.

A request's features see the guesses before the step (RequestFeatures.check_guesses):
a structured output keeps only the leading guesses its grammar allows (a refused one
could never be the model's sample, its row being masked) and readies each checked
row's mask. Not guessed: requests with stop strings before min_tokens is reached (a
stop string may not be searched for in those tokens' text).
"""

from dataclasses import dataclass

from ..engine.scheduler import ScheduledSequence, Scheduler
from ..engine.sequence import Sequence, SequenceStatus
from .proposer import Proposer

# the longest a sequence whose guesses keep missing (or whose proposer keeps finding
# nothing) goes without trying again, in its decode steps
MAX_WAIT_STEPS = 16


@dataclass
class GuessPace:
    num_guesses: int        # to ask for at the next try
    wait_steps: int = 0     # decode steps to go without guesses before that try
    misses: int = 0         # tries in a row with no guess accepted, or none proposed


@dataclass
class SettledGuesses:
    """What one step's checked guesses came to, for the engine's counters."""
    num_drafts: int = 0             # sequences that had guesses checked
    num_draft_tokens: int = 0       # guesses checked
    num_accepted_tokens: int = 0    # of those, accepted


class Speculator:
    def __init__(self, proposer: Proposer, num_speculative_tokens: int, scheduler: Scheduler, max_model_len: int):
        self.proposer = proposer
        self.max_guesses = num_speculative_tokens
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.max_model_len = max_model_len
        self.paces: dict[Sequence, GuessPace] = {}  # of running sequences that have been decoding
        self._num_preemptions = scheduler.num_preemptions

    def add_guesses(self, scheduled: list[ScheduledSequence]) -> bool:
        """Give the step's pure decodes their guesses (ScheduledSequence.guesses), with
        the KV slots they need; whether any got some."""
        self._forget_stopped()
        budget = self.scheduler.max_num_batched_tokens - sum([s.num_new_tokens for s in scheduled])
        items, wanted = [], []
        for item in scheduled:
            if budget <= 0:
                break
            seq = item.seq
            if item.num_new_tokens == 1 and seq.num_computed_tokens + 1 == len(seq.token_ids) \
                    and seq.num_output_tokens:
                num = min(self._wanted(seq), budget)
                if num > 0:
                    items.append(item)
                    wanted.append(num)
                    budget -= num
        if not items:
            return False
        block_manager, block_size = self.block_manager, self.block_manager.block_size
        guessed = False
        for item, guesses, num in zip(items, self.proposer.propose([s.seq for s in items], wanted), wanted):
            seq = item.seq
            if not guesses:  # nothing to guess from: look again after a while
                self._wait(self.paces[seq])
                continue
            # only blocks free now: room for the decode token and the guesses after it
            room = (len(seq.block_table) + block_manager.num_free_blocks) * block_size - len(seq.token_ids)
            guesses = list(guesses[:min(num, room)])
            features = seq.request.features
            if guesses and features is not None and features.guessing:
                # a grammar keeps the guesses it allows; none left counts as a miss
                guesses = features.check_guesses(seq, guesses)
                if not guesses:
                    self._pace(seq, 1, 0)
            if guesses:
                block_manager.append_slots(seq, 1 + len(guesses))
                item.guesses = guesses
                guessed = True
        return guessed

    def _wanted(self, seq: Sequence) -> int:
        """How many guesses to ask for `seq` this step."""
        p = seq.params
        if p.stop_strings and seq.num_output_tokens < p.min_tokens:
            return 0
        pace = self.paces.get(seq)
        if pace is None:
            pace = self.paces[seq] = GuessPace(self.max_guesses)
        if pace.wait_steps:
            pace.wait_steps -= 1
            return 0
        # every emitted token (the guesses' and the one after them) within both limits
        room = self.max_model_len - len(seq.token_ids) - 1
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - seq.num_output_tokens - 1)
        return min(pace.num_guesses, room)

    def settle(self, accepted: list[tuple[ScheduledSequence, int]]) -> SettledGuesses:
        """After the step's tokens are committed: for each item with guesses and how many
        were accepted, count those as computed and give back the blocks of the others."""
        settled = SettledGuesses()
        block_manager = self.block_manager
        computed = []
        for item, num_accepted in accepted:
            seq, num_guesses = item.seq, len(item.guesses)
            settled.num_drafts += 1
            settled.num_draft_tokens += num_guesses
            settled.num_accepted_tokens += num_accepted
            self._pace(seq, num_guesses, num_accepted)
            if seq.is_finished:  # its blocks went with it
                continue
            # the scheduler counted the decode token; the accepted guesses' KV is right too
            seq.num_computed_tokens += num_accepted
            block_manager.release_slots(seq, seq.num_computed_tokens)
            computed.append(seq)
        block_manager.register_computed_blocks(computed)
        return settled

    def _pace(self, seq: Sequence, num_guesses: int, num_accepted: int) -> None:
        pace = self.paces.get(seq)
        if pace is None:
            return
        if num_accepted == 0:
            self._wait(pace)
            pace.num_guesses = 1
        else:
            pace.misses = 0
            pace.num_guesses = min(self.max_guesses, max(pace.num_guesses, 2 * num_guesses)
                                   if num_accepted == num_guesses else num_accepted + 1)

    @staticmethod
    def _wait(pace: GuessPace) -> None:
        """After a try that came to nothing: none the first time, then ever longer waits."""
        pace.wait_steps = min(2 ** pace.misses - 1, MAX_WAIT_STEPS)
        pace.misses += 1

    def _forget_stopped(self) -> None:
        """Drop the pace, and the proposer's state, of sequences no longer running
        (finished, aborted or preempted: a preempted one starts afresh)."""
        scheduler = self.scheduler
        if len(self.paces) <= len(scheduler.running) and scheduler.num_preemptions == self._num_preemptions:
            return
        self._num_preemptions = scheduler.num_preemptions
        for seq in [s for s in self.paces if s.status is not SequenceStatus.RUNNING]:
            del self.paces[seq]
            self.proposer.release(seq)
