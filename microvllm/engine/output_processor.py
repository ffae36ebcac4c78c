"""OutputProcessor: what a step's sampled tokens do to their requests, and what callers see.

The one stage between the model runner and RequestOutput. Per sampled row it appends
the token and applies the stop rules (stated once, in `_stop`); a request's features
(features.py) add what they do through their hooks, on the rows they wake. It holds
the unfinished requests and those whose output the next step() returns, and builds
each RequestOutput: whole, or only what is new since the last one for DELTA streams.

A step stays all or nothing by working in two halves: `decide` does everything slow
(detokenising, log-prob entries) and only reads state; `commit` applies what was decided
in plain bookkeeping, which the engine runs with Ctrl-C held back.

Checking guesses (speculative decoding) happens here, in `_decide_guessed`: a sequence's
rows are walked in order, each decided as a plain step would decide it for the sequence
at that point; the walk stops after the first row whose token is not the next guess
(that token, the model's own sample, is emitted as a plain step would emit it), and at
a token that ends the sequence or makes a feature force tokens.
"""

import time
from dataclasses import dataclass

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import RequestOutputKind
from ..tokenizer import Tokenizer
from .features import RequestFeatures
from .logprobs import LogprobRows, new_prompt_entries, start_prompt_logprobs
from .model_runner import StepOutput
from .request_feature import TokenUpdate
from .scheduler import ScheduledSequence, Scheduler
from .sequence import Request, Sequence


@dataclass
class StepDecisions:
    updates: list[TokenUpdate | None]          # per sampled row; None: the token is only appended
    prompt_logprobs: list[tuple[Request, list[dict[int, Logprob]]]]
    # in a step that checks guesses: the tokens emitted, in order, with their updates
    # (in place of `updates`), and each item with guesses with how many were accepted
    emitted: list[tuple[ScheduledSequence, int, TokenUpdate | None]] | None = None
    accepted: list[tuple[ScheduledSequence, int]] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler, max_model_len: int):
        self.tokenizer = tokenizer
        self.scheduler = scheduler            # finishing a sequence frees its blocks
        self.max_model_len = max_model_len
        self.eos_token_ids = tokenizer.eos_token_ids
        self.requests: dict[str, Request] = {}  # unfinished, by id
        # requests whose outputs the next take_outputs() returns (finished, or streamed and advanced)
        self._due: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        start_prompt_logprobs(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish every sequence of a request with "abort"; its final output, or None for
        an unknown id."""
        self._due.pop(request_id, None)
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, "abort")
        request.finished_time = time.time()
        return self.make_output(request)

    def has_outputs(self) -> bool:
        return bool(self._due)

    def take_outputs(self) -> list[RequestOutput]:
        # built before the list is emptied: an interrupt here returns them next step
        outputs = [self.make_output(request) for request in self._due.values()]
        self._due = {}
        return outputs

    # -- a step's two halves ------------------------------------------------------------

    def decide(self, result: StepOutput) -> StepDecisions:
        tokenizer = self.tokenizer
        prompt_logprobs = [(chunk.request, new_prompt_entries(chunk, tokenizer)) for chunk in result.prompt_logprobs]
        if result.row_views is not None:
            return self._decide_guessed(result, prompt_logprobs)
        sampled = result.sampled
        decide_row = self._decide_row  # a local: this runs for every row
        updates = [decide_row(item.seq, token, sampled.logprobs, row)
                   for row, (item, token) in enumerate(zip(result.sampled_seqs, sampled.token_ids if sampled else ()))]
        return StepDecisions(updates, prompt_logprobs)

    def _decide_row(self, seq: Sequence, token: int, logprobs: LogprobRows | None, row: int) -> TokenUpdate | None:
        """What sampling `token` at `row` does beyond appending it (None: nothing); `seq`
        is the sequence as the row saw it."""
        if token in seq.wake_tokens:
            return self._decide_with(seq.request.features, seq, token, logprobs, row)
        finish = self._stop(seq, token)[0]
        return None if finish is None else TokenUpdate(seq, finish=finish)

    def _decide_guessed(self, result: StepOutput, prompt_logprobs: list) -> StepDecisions:
        """decide() for a step that checks guesses (see the module's docstring)."""
        sampled, items, views = result.sampled, result.sampled_seqs, result.row_views
        emitted, accepted = [], []
        row = 0
        while row < len(items):
            item = items[row]
            guesses = item.guesses
            for j in range(len(guesses) + 1):
                token = sampled.token_ids[row + j]
                update = self._decide_row(views[row + j], token, sampled.logprobs, row + j)
                if update is not None:
                    update.seq = item.seq  # decided on the row's view; committed to the sequence
                emitted.append((item, token, update))
                if (j == len(guesses) or token != guesses[j]
                        or (update is not None and (update.finish is not None or update.forced))):
                    break
            if guesses:
                # a right guess that ended the sequence counts as accepted (its KV no longer
                # matters); one a tool's answer follows is recomputed with it, as a plain step would
                ended_on_guess = j < len(guesses) and token == guesses[j] and update is not None \
                    and update.finish is not None
                accepted.append((item, j + ended_on_guess))
            row += len(guesses) + 1
        return StepDecisions([], prompt_logprobs, emitted, accepted)

    def _decide_with(self, features: RequestFeatures, seq: Sequence, token: int,
                     logprobs: LogprobRows | None, row: int) -> TokenUpdate:
        """The row's update where `token` wakes the request's features."""
        forced = []
        for feature in features.forcing:
            forced += feature.forced_tokens(seq, token)
        if forced:
            forced = self._within_limits(seq, forced)
        text = self._text_with(seq, token, forced) if features.watches_text else None
        finish, text = self._stop(seq, token, text, len(forced), features)
        update = TokenUpdate(seq, text=text, finish=finish, forced=forced)
        for feature in features.deciding:
            feature.on_token(seq, token, update, logprobs, row)
        return update

    def commit(self, result: StepOutput, decisions: StepDecisions) -> None:
        """Apply what the step decided: plain bookkeeping, nothing that decodes or computes."""
        for request, entries in decisions.prompt_logprobs:
            request.prompt_logprobs += entries
            self.scheduler.block_manager.keep_prompt_logprobs(request.sequences[0])
        now, final_only = time.time(), RequestOutputKind.FINAL_ONLY  # a local: enum lookups are slow
        rows = decisions.emitted
        if rows is None:
            rows = zip(result.sampled_seqs, result.sampled.token_ids if result.sampled else (), decisions.updates)
        for item, token, update in rows:
            seq, request = item.seq, item.seq.request
            seq.token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            if update is not None:
                self._apply(update, now)
            if request.output_kind is not final_only:
                self._due[request.request_id] = request  # streamed: the output so far

    def _apply(self, update: TokenUpdate, now: float) -> None:
        seq, request = update.seq, update.seq.request
        if request.features is not None:
            for feature in request.features.committing:
                feature.commit(seq, update)
        if update.forced:
            seq.token_ids += update.forced
        if update.finish is not None:
            self._finish(seq, *update.finish)
            if request.is_finished:
                request.finished_time = now
                del self.requests[request.request_id]
                self._due[request.request_id] = request

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)  # frees its blocks
        seq.request.num_finished_sequences += 1

    # -- the stop rules -----------------------------------------------------------------

    def _stop(self, seq: Sequence, token: int, text: str | None = None, num_forced: int = 0,
              features: RequestFeatures | None = None) -> tuple[tuple | None, str | None]:
        """((finish_reason, stop_reason) if `token` (and the `num_forced` tokens a feature
        forces after it) end `seq`, else None; the output text, cut after a stop string).
        Called for every sampled row: the common case returns after a few comparisons."""
        p = seq.params
        num_output_tokens = len(seq.token_ids) + 1 - seq.num_prompt_tokens
        if num_output_tokens >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return ("stop", None), text
            if token in p.stop_token_ids:
                return ("stop", token), text
            # the text of the first min_tokens tokens is never searched
            if text is not None and num_output_tokens > p.min_tokens:
                for feature in features.stopping:
                    stop = feature.stop(seq, text)
                    if stop is not None:
                        return ("stop", stop[0]), stop[1]
        num_output_tokens += num_forced  # _within_limits keeps them within both limits
        if num_output_tokens == p.max_tokens or num_output_tokens + seq.num_prompt_tokens >= self.max_model_len:
            return ("length", None), text
        return None, text

    def _within_limits(self, seq: Sequence, forced: list[int]) -> list[int]:
        """The forced tokens cut to what max_tokens and max_model_len leave after the
        sampled one (they count toward both, as nanochat counts a tool's answer)."""
        room = self.max_model_len - len(seq.token_ids) - 1
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return forced[:max(room, 0)]

    def _text_with(self, seq: Sequence, token: int, forced: list[int]) -> str:
        return self.tokenizer.decode(seq.output_token_ids + [token] + forced, seq.params.skip_special_tokens)

    # -- outputs ------------------------------------------------------------------------

    def make_output(self, request: Request) -> RequestOutput:
        features = request.features
        stream = None if features is None else features.stream
        completions = []
        for seq in request.sequences:
            text = None if features is None else features.output_text(seq)
            sent = 0
            if stream is not None:
                text, sent = stream.take(seq, text, lambda ids: self._decoded(seq, ids))
            elif text is None:
                text = self._decoded(seq, seq.output_token_ids)
            masks = None if features is None else features.output_masks(seq, sent)
            logprobs = seq.logprobs
            completions.append(CompletionOutput(
                seq.index, text, seq.token_ids[seq.num_prompt_tokens + sent:], seq.cumulative_logprob,
                None if logprobs is None else logprobs[sent:],  # a streamed copy stays as it was
                seq.finish_reason, seq.stop_reason,
                masks if masks is not None else [1] * (seq.num_output_tokens - sent)))
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, request.prompt_logprobs,
            completions, request.is_finished,
            RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
            max(request.sequences[0].num_cached_tokens, 0))

    def _decoded(self, seq: Sequence, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, seq.params.skip_special_tokens) if seq.params.detokenize else ""
