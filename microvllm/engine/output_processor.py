"""OutputProcessor: what a step's sampled tokens do to their requests, and what callers see.

The one stage between the model runner and RequestOutput. Per sampled row it appends
the token (advancing a structured output's grammar matcher), records its log-probs,
applies the stop rules (stated once, in `_stop`) and keeps the text where stop strings
are watched; it holds the unfinished requests and those whose output the next step()
returns, and builds each RequestOutput: whole, or only what is new since the last one
for DELTA streams.

A step stays all or nothing by working in two halves: `decide` does everything slow
(detokenising, log-prob entries) and only reads state; `commit` applies what was decided
in plain bookkeeping, which the engine runs with Ctrl-C held back.
"""

import time
from dataclasses import dataclass, replace

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import RequestOutputKind
from ..tokenizer import Tokenizer
from .model_runner import PromptLogprobs, StepOutput
from .sampler import LogprobRows
from .scheduler import Scheduler
from .sequence import Request, Sequence


@dataclass
class TokenUpdate:
    """What a step decided for one sampled row beyond appending its token."""
    seq: Sequence
    logprob: float | None = None
    logprob_entry: dict[int, Logprob] | None = None
    text: str | None = None           # the output decoded so far, where stop strings are watched
    finish: tuple | None = None       # (finish_reason, stop_reason)
    forced: list[int] | None = None   # a tool's answer, appended after the sampled token


@dataclass
class StepDecisions:
    updates: list[TokenUpdate | None]          # per sampled row; None: the token is only appended
    prompt_logprobs: list[tuple[Request, list[dict[int, Logprob]]]]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler, max_model_len: int):
        self.tokenizer = tokenizer
        self.scheduler = scheduler            # finishing a sequence frees its blocks
        self.max_model_len = max_model_len
        self.eos_token_ids = tokenizer.eos_token_ids
        self.python_end = tokenizer.special["<|python_end|>"]  # the token that ends a tool call
        self.requests: dict[str, Request] = {}  # unfinished, by id
        # requests whose outputs the next take_outputs() returns (finished, or streamed and advanced)
        self._due: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        if request.params.prompt_logprobs is not None:
            # the first token has no predecessor; tokens before the start are not asked for
            request.prompt_logprobs = [None] * max(1, min(request.params.prompt_logprobs_start,
                                                          len(request.prompt_token_ids)))
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
                self.scheduler.finish(seq, "abort")
                request.num_finished_sequences += 1
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
        sampled = result.sampled
        updates = [None] * len(result.sampled_seqs)
        stop, python_end = self._stop, self.python_end  # locals: this loop runs for every row
        for row, (item, token) in enumerate(zip(result.sampled_seqs, sampled.token_ids if sampled else ())):
            seq = item.seq
            p, forced = seq.params, None
            if token == python_end and seq.request.tool_calls is not None:
                forced = self._tool_answer(seq, token)
            text = self._text_with(seq, token, forced) if p.stop_strings else None
            finish, text = stop(seq, token, text, len(forced) if forced else 0)
            if finish is not None or text is not None or forced or p.logprobs is not None:
                update = updates[row] = TokenUpdate(seq, text=text, finish=finish, forced=forced)
                if p.logprobs is not None:
                    update.logprob = sampled.logprobs.logprobs[row]
                    update.logprob_entry = self._logprob_entry(sampled.logprobs, row, token)
        return StepDecisions(updates, [(p.request, self._new_prompt_logprobs(p)) for p in result.prompt_logprobs])

    def commit(self, result: StepOutput, decisions: StepDecisions) -> None:
        """Apply what the step decided: plain bookkeeping, nothing that decodes or computes."""
        for request, entries in decisions.prompt_logprobs:
            request.prompt_logprobs += entries
            self.scheduler.block_manager.keep_prompt_logprobs(request.sequences[0])
        now, final_only = time.time(), RequestOutputKind.FINAL_ONLY  # a local: enum lookups are slow
        tokens = result.sampled.token_ids if result.sampled else ()
        for item, token, update in zip(result.sampled_seqs, tokens, decisions.updates):
            seq, request = item.seq, item.seq.request
            seq.token_ids.append(token)
            if seq.grammar is not None and not seq.grammar.accept_token(token):
                # only where allowed_token_ids, bad_words, a logits processor or min_tokens
                # left the grammar no token: the output cannot go on as its grammar says
                update = replace(update or TokenUpdate(seq), finish=("abort", None))
            if request.first_token_time is None:
                request.first_token_time = now
            if update is not None:
                self._apply(update, now)
            if request.output_kind is not final_only:
                self._due[request.request_id] = request  # streamed: the output so far

    def _apply(self, update: TokenUpdate, now: float) -> None:
        seq, request = update.seq, update.seq.request
        if update.logprob_entry is not None:
            seq.cumulative_logprob += update.logprob
            seq.logprobs.append(update.logprob_entry)
        if update.forced:
            start = seq.num_output_tokens
            seq.token_ids += update.forced
            seq.forced_spans.append((start, start + len(update.forced)))
            if seq.logprobs is not None:  # forced tokens were not sampled: no log-probs
                seq.logprobs += [None] * len(update.forced)
        if update.text is not None:
            seq.text = update.text
        if update.finish is not None:
            self.scheduler.finish(seq, *update.finish)
            request.num_finished_sequences += 1
            if request.is_finished:
                request.finished_time = now
                del self.requests[request.request_id]
                self._due[request.request_id] = request

    # -- the stop rules -----------------------------------------------------------------

    def _stop(self, seq: Sequence, token: int, text: str | None, num_forced: int
              ) -> tuple[tuple | None, str | None]:
        """((finish_reason, stop_reason) if `token` (and the `num_forced` tokens a tool
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
                stop = self._stop_string(seq, text)
                if stop is not None:
                    return ("stop", stop[0]), stop[1]
        num_output_tokens += num_forced  # _tool_answer keeps them within both limits
        if num_output_tokens == p.max_tokens or num_output_tokens + seq.num_prompt_tokens >= self.max_model_len:
            return ("length", None), text
        return None, text

    def _text_with(self, seq: Sequence, token: int, forced: list[int] | None) -> str:
        return self.tokenizer.decode(seq.output_token_ids + [token] + (forced or []), seq.params.skip_special_tokens)

    def _tool_answer(self, seq: Sequence, token: int) -> list[int]:
        """The tokens a tool forces after `token`, cut to what max_tokens and max_model_len
        leave (they count toward both, as nanochat counts them)."""
        forced = seq.request.tool_calls.forced_tokens(seq.output_token_ids + [token], self.tokenizer)
        room = self.max_model_len - len(seq.token_ids) - 1
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return forced[:max(room, 0)]

    @staticmethod
    def _stop_string(seq: Sequence, text: str) -> tuple[str, str] | None:
        """(the first stop string that ends in the text this token added, the text cut there)."""
        p = seq.params
        # what was searched before cannot hold a stop string, except where a trailing
        # partial UTF-8 character (decoded as U+FFFD) has now become a real one
        searched = len(seq.text.rstrip("\ufffd"))
        hits = [(i, s) for s in p.stop_strings if (i := text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        return stop, text[:index + len(stop)] if p.include_stop_str_in_output else text[:index]

    # -- log-probs ----------------------------------------------------------------------

    def _new_prompt_logprobs(self, chunk: PromptLogprobs) -> list[dict[int, Logprob]]:
        # prompt positions are computed in order; a recomputed chunk repeats what is known
        request, rows = chunk.request, chunk.rows
        known = len(request.prompt_logprobs)
        assert known >= chunk.first_index, "the block manager reuses cached KV only where the entries are known"
        return [self._logprob_entry(rows, i, request.prompt_token_ids[chunk.first_index + i])
                for i in range(known - chunk.first_index, len(rows.logprobs))]

    def _logprob_entry(self, rows: LogprobRows, i: int, token: int) -> dict[int, Logprob]:
        decode = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
        entry = {t: Logprob(lp, r + 1, decode(t))
                 for r, (t, lp) in enumerate(zip(rows.top_ids[i], rows.top_logprobs[i]))}
        entry[token] = Logprob(rows.logprobs[i], rows.ranks[i], decode(token))
        return entry

    # -- outputs ------------------------------------------------------------------------

    def make_output(self, request: Request) -> RequestOutput:
        delta = request.output_kind is RequestOutputKind.DELTA
        completions = []
        for seq in request.sequences:
            if delta:
                text, token_ids, logprobs, masks = self._delta(seq)
            else:
                text, token_ids, logprobs, masks = \
                    self._text(seq), seq.output_token_ids, seq.logprobs, seq.output_token_masks()
            completions.append(CompletionOutput(
                seq.index, text, token_ids, seq.cumulative_logprob,
                None if logprobs is None else list(logprobs),  # a streamed copy stays as it was
                seq.finish_reason, seq.stop_reason, masks))
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, request.prompt_logprobs,
            completions, request.is_finished,
            RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
            max(request.sequences[0].num_cached_tokens, 0))

    def _text(self, seq: Sequence) -> str:
        return seq.text if self._cut_at_stop_string(seq) else self._decoded(seq, seq.output_token_ids)

    def _decoded(self, seq: Sequence, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, seq.params.skip_special_tokens) if seq.params.detokenize else ""

    def _delta(self, seq: Sequence) -> tuple:
        """What a DELTA stream has not sent of `seq` yet (text, token ids, log-probs, masks);
        marks it sent. A trailing partial UTF-8 character waits until it is whole, unless
        the sequence has finished. Only the tokens after the settled ones are decoded, so a
        stream's text costs time linear in its length, not quadratic."""
        tokens, start, sent_tokens = seq.token_ids, seq.num_prompt_tokens, seq.num_streamed_tokens
        if self._cut_at_stop_string(seq):
            offset, text = 0, seq.text  # the whole text
        else:  # the text after the settled characters
            offset = seq.num_settled_chars
            text = self._decoded(seq, tokens[start + seq.num_settled_tokens:])
            if not seq.is_finished and text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            else:  # all of it goes out now
                seq.num_settled_tokens, seq.num_settled_chars = len(tokens) - start, offset + len(text)
        new_text = text[seq.num_streamed_chars - offset:]
        seq.num_streamed_tokens = len(tokens) - start
        seq.num_streamed_chars = max(offset + len(text), seq.num_streamed_chars)
        logprobs = seq.logprobs
        return (new_text, tokens[start + sent_tokens:], None if logprobs is None else logprobs[sent_tokens:],
                seq.output_token_masks(sent_tokens))

    @staticmethod
    def _cut_at_stop_string(seq: Sequence) -> bool:
        """Whether a stop string ended `seq`: its text, cut there, is then in seq.text."""
        return bool(seq.params.stop_strings) and seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)
