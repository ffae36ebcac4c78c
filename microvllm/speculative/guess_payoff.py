"""GuessPayoff: whether a proposer's guesses are worth the time it takes to make them.

A step whose sequences keep `kept` guesses each, on average, emits 1 + kept tokens per
sequence in the target's step time plus the proposer's; without guesses it emits 1 in
the target's step time. Guessing pays while kept > proposer time / target step time.
Both are read off the proposer's calls (the time between two calls is the target's
step), as medians of the last PAYOFF_WINDOW, so that one slow step or a pause between
requests does not decide; and apart for each batch size (to a power of two), since a
target step over a larger batch costs more, a draft model's step often barely more.
"""

import statistics
import time
from collections import defaultdict, deque

# the calls it judges by, the fewest it judges on, and how often it guesses
# anyway while guesses do not pay (to notice when they do again): at first every
# PROBE_EVERY calls, twice as seldom after each probe that changes nothing, down to
# every MAX_PROBE_EVERY
PAYOFF_WINDOW = 16
MIN_PAYOFF_SAMPLES = 8
PROBE_EVERY = 16
MAX_PROBE_EVERY = 512


class GuessPayoff:
    def __init__(self):
        new_window = lambda: deque(maxlen=PAYOFF_WINDOW)  # noqa: E731
        self.kept: defaultdict[int, deque[float]] = defaultdict(new_window)  # guesses kept per sequence
        self.cost: defaultdict[int, deque[float]] = defaultdict(new_window)  # proposer time / target step time
        self.probe_every: defaultdict[int, int] = defaultdict(lambda: PROBE_EVERY)
        self.calls_since_probe: defaultdict[int, int] = defaultdict(int)
        self.drafted_size: int | None = None  # of the last call, if it guessed: the next kept are its
        self.last_call_end: float | None = None

    def pays(self, num_seqs: int) -> bool:
        size = num_seqs.bit_length()
        kept, cost = self.kept[size], self.cost[size]
        if len(cost) < MIN_PAYOFF_SAMPLES or not kept or statistics.median(kept) > statistics.median(cost):
            self.probe_every[size] = PROBE_EVERY
            return True
        self.calls_since_probe[size] += 1
        if self.calls_since_probe[size] < self.probe_every[size]:
            return False
        self.calls_since_probe[size] = 0
        self.probe_every[size] = min(2 * self.probe_every[size], MAX_PROBE_EVERY)
        return True

    def record(self, kept: list[int], num_seqs: int, call_start: float, drafted: bool) -> None:
        """After a call for `num_seqs` sequences: how many of the guesses the last call
        gave each sequence it kept, when the call began, and whether it guessed."""
        now = time.perf_counter()
        if kept and self.drafted_size is not None:
            self.kept[self.drafted_size].append(sum(kept) / len(kept))
        if drafted and self.last_call_end is not None:
            self.cost[num_seqs.bit_length()].append((now - call_start) / max(call_start - self.last_call_end, 1e-6))
        self.drafted_size = num_seqs.bit_length() if drafted else None
        self.last_call_end = now
