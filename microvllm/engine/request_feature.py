"""RequestFeature: the protocol through which a request's features reach the hot path.

A feature is what a request asks for beyond plain sampling and the stop rules every
request has: tool calls, a structured output, stop strings, a stream of deltas,
log-probs. Each is one object holding its own state (per sequence where it has any);
the sampler and the output processor call it only through the hooks below, which do
nothing unless a feature overrides them. A request's features sit in one list
(`features.RequestFeatures`); a request without any has none, and its rows skip them.

A step calls the hooks in this order:
0. `check_guesses` (speculative decoding, before the step): how many of a proposer's
   guesses the feature lets the step check;
1. `logits_mask` (the sampler, in a step that holds a constrained request): a grammar
   matcher whose allowed tokens mask the row (or, for a row after checked guesses, the
   bitmask row `check_guesses` filled);
then, on the rows a feature wakes (every row where `every_token`, else those that
sampled its `wake_token`; `Sequence.wake_tokens` holds the request's):
2. `forced_tokens` (decide): tokens the feature forces after the sampled one;
3. `stop` (decide, inside the stop rules): a stop string in the row's text;
4. `on_token` (decide): the slow, read-only work of the row (log-prob entries);
5. `commit` (commit, on every row the step decided something for): plain
   bookkeeping, with Ctrl-C held back; may end the sequence.
Outputs then read `output_text` and `output_masks` (and a DELTA stream's cursor,
`StreamDeltas.take`).
"""

from dataclasses import dataclass

from ..outputs import Logprob
from .sequence import Sequence


@dataclass
class TokenUpdate:
    """What a step decided for one sampled row beyond appending its token."""
    seq: Sequence
    logprob: float | None = None
    logprob_entry: dict[int, Logprob] | None = None
    text: str | None = None           # the output decoded so far, where stop strings are watched
    finish: tuple | None = None       # (finish_reason, stop_reason)
    forced: list[int] | None = None   # a tool's answer, appended after the sampled token


class RequestFeature:
    every_token = False         # whether every sampled token wakes the feature
    wake_token: int | None = None  # else the one token that does
    watches_text = False        # whether `stop` needs the output's text decoded

    def logits_mask(self, seq: Sequence):
        """What masks `seq`'s next logits: an xgrammar GrammarMatcher (its allowed tokens),
        a filled bitmask row (int32, one bit per token), or None."""
        return None

    def check_guesses(self, seq: Sequence, guesses: list[int]) -> int:
        """How many of the leading `guesses` (a proposer's, for the tokens after `seq`'s last)
        the step may check; `logits_mask` then answers for `seq` with those appended."""
        return len(guesses)

    def forced_tokens(self, seq: Sequence, token: int) -> list[int]:
        """Tokens to force after `token`, which `seq` just sampled."""
        return []

    def stop(self, seq: Sequence, text: str) -> tuple[str, str] | None:
        """(the stop string `text` newly holds, the text cut there), or None."""
        return None

    def on_token(self, seq: Sequence, token: int, update: TokenUpdate,
                 logprobs: "LogprobRows | None", row: int) -> None:
        """Decide what `token` (the step's row `row`) adds, into `update`; only reads state.
        `logprobs`: the step's logprobs.LogprobRows, where a row asked for them."""

    def commit(self, seq: Sequence, update: TokenUpdate) -> None:
        """Apply `update`; `seq` holds the sampled token already, not the forced ones yet."""

    def output_text(self, seq: Sequence) -> str | None:
        """The output's text where the feature decides it (cut at a stop string), else None."""
        return None

    def output_masks(self, seq: Sequence, start: int) -> list[int] | None:
        """1 per output token from `start` on that was sampled, 0 per forced one; None: all 1."""
        return None
