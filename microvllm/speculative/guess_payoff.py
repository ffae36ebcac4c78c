"""GuessPayoff: whether a proposer's guesses make the sequences it guesses for faster.

What counts is output tokens per second of the sequences asked about, accepted guesses
included and the proposer's own time counted: read off the interval from one call of
the proposer to the next (the target's steps in between, and the call itself), after
calls that guessed and after calls that did not. Guessing goes on while the median
rate of the first beats that of the second over the last PAYOFF_WINDOW intervals (so
that one slow step or a pause between requests does not decide), judged apart for each
batch size (to a power of two): a target step over a larger batch costs more, a draft
model's step often barely more. Until both kinds have MIN_PAYOFF_SAMPLES intervals,
every other call guesses.
"""

import statistics
from collections import defaultdict, deque

from ..engine.sequence import Sequence

PAYOFF_WINDOW = 16
MIN_PAYOFF_SAMPLES = 8
# while guesses do not pay, a call guesses anyway (to notice when they do again) every
# PROBE_EVERY calls, twice as seldom after each probe that changes nothing, down to
# every MAX_PROBE_EVERY
PROBE_EVERY = 16
MAX_PROBE_EVERY = 512


class GuessPayoff:
    def __init__(self):
        window = lambda: deque(maxlen=PAYOFF_WINDOW)  # noqa: E731
        # [guessed][batch size]: output tokens per second per sequence, after such calls
        self.rates: dict[bool, defaultdict[int, deque[float]]] = {True: defaultdict(window),
                                                                   False: defaultdict(window)}
        self.num_learning_calls: defaultdict[int, int] = defaultdict(int)
        self.probe_every: defaultdict[int, int] = defaultdict(lambda: PROBE_EVERY)
        self.calls_since_probe: defaultdict[int, int] = defaultdict(int)
        self.last_call: tuple[float, int, bool] | None = None  # its start, batch size, whether it guessed
        self.last_num_tokens: dict[Sequence, int] = {}        # of the sequences it was asked about

    def pays(self, num_seqs: int) -> bool:
        size = num_seqs.bit_length()
        guessing, plain = self.rates[True][size], self.rates[False][size]
        if len(guessing) < MIN_PAYOFF_SAMPLES or len(plain) < MIN_PAYOFF_SAMPLES:
            self.num_learning_calls[size] += 1
            return self.num_learning_calls[size] % 2 == 1
        if statistics.median(guessing) > statistics.median(plain):
            self.probe_every[size] = PROBE_EVERY
            return True
        self.calls_since_probe[size] += 1
        if self.calls_since_probe[size] < self.probe_every[size]:
            return False
        self.calls_since_probe[size] = 0
        self.probe_every[size] = min(2 * self.probe_every[size], MAX_PROBE_EVERY)
        return True

    def record(self, seqs: list[Sequence], call_start: float, guessed: bool) -> None:
        """At the end of a call that began at `call_start` (time.perf_counter()), asked
        about `seqs`: the rate since the last call, which goes to that call's kind."""
        if self.last_call is not None:
            last_start, size, last_guessed = self.last_call
            last = self.last_num_tokens
            gained = [len(seq.token_ids) - last[seq] for seq in seqs if seq in last]
            if gained and call_start > last_start:
                self.rates[last_guessed][size].append(sum(gained) / len(gained) / (call_start - last_start))
        self.last_call = (call_start, len(seqs).bit_length(), guessed)
        self.last_num_tokens = {seq: len(seq.token_ids) for seq in seqs}
