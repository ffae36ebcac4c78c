"""LLMEngine: requests in, one scheduled forward per step, finished outputs out.

`add_request` validates and queues a request; `step` schedules, runs the model once,
appends the sampled tokens, applies the stop rules and returns the requests that
finished; `abort_request` drops a request and frees its blocks at once.

A step is all or nothing. Scheduling and the closing bookkeeping are short and hold
Ctrl-C back until they are done (`interrupts_held`); everything slow in between (the
forward, sampling, detokenising for stop strings and log-probs) only reads the
engine's state and decides. An exception there leaves the blocks that scheduling
reserved, which the next step's schedule reuses: the engine carries on as if the step
had never started.
"""

import itertools
import logging
import numbers
import random
import time
from dataclasses import dataclass

import torch
import xxhash

from ..model.attention import resolve_attention_backend
from ..model.cpu_linear import native_bfloat16, pack_linears
from ..model.quantization import quantize_linears
from ..model.sources import load_model_and_tokenizer
from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from ..validation import check_type
from . import logits_processors
from .block_manager import BlockManager
from .config import EngineConfig
from .cpu_threads import apply_cpu_threads
from .cuda_graphs import DecodeGraphs
from .interrupts import interrupts_held
from .kv_cache import PagedKVCache
from .memory import describe_kv_cache, num_kv_blocks
from .model_runner import ModelRunner, StepOutput
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Request, Sequence
from .stats import EngineStats, StepTimer

logger = logging.getLogger(__name__)


@dataclass
class TokenUpdate:
    """What a step decided for one sampling sequence, applied when the step commits."""
    seq: Sequence
    token: int
    logprob: float | None = None
    logprob_entry: dict | None = None
    text: str | None = None           # the output decoded so far, where stop strings are watched
    finish: tuple | None = None       # (finish_reason, stop_reason)


def uses_decode_graphs(device, enforce_eager: bool, attention_backend: str, max_model_len: int) -> bool:
    """Decode steps replay CUDA graphs on CUDA unless enforce_eager; with the SDPA
    backend they still do (graphs beat eager launches), but the user is told its cost."""
    if device.type != "cuda" or enforce_eager:
        return False
    if attention_backend == "sdpa":
        logger.warning(f"CUDA graphs with attention_backend='sdpa': its decode twin reads all "
                       f"max_model_len={max_model_len} keys of every sequence on full-attention "
                       "layers, whatever the context; pip install triton (or flash_attn) for a "
                       "decode that reads only each sequence's context, or pass enforce_eager=True")
    return True


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        if self.device.type == "cpu":
            apply_cpu_threads(config.cpu_threads)
        attention_backend = resolve_attention_backend(config.attention_backend, self.device, self.dtype)
        self.block_size = config.block_size or attention_backend.default_block_size
        if self.block_size % attention_backend.block_size_multiple:
            raise ValueError(f"block_size={self.block_size} is not supported by {attention_backend.name}: "
                             f"use a multiple of {attention_backend.block_size_multiple}, "
                             f"or attention_backend='sdpa'")
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model, config.tokenizer, config.step, config.revision, self.dtype, self.device,
            config.logit_softcap, max_positions=config.max_model_len)
        if attention_backend.model_ops is not None:
            self.model.ops = attention_backend.model_ops
        if config.quantization is not None:
            self.model = quantize_linears(self.model, config.quantization)
        elif self.device.type == "cpu" and self.dtype == torch.bfloat16 and native_bfloat16():
            pack_linears(self.model)
        model_config = self.model.config
        if self.tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {model_config.vocab_size}: wrong tokenizer for this checkpoint")
        self.max_model_len = config.max_model_len or model_config.sequence_len
        self.vocab_size = model_config.vocab_size

        graphs = uses_decode_graphs(self.device, config.enforce_eager, attention_backend.name, self.max_model_len)
        num_blocks = num_kv_blocks(config, self.model, self.device, self.dtype, self.max_model_len,
                                   self.block_size, attention_backend.decode if graphs else None)
        capacity = num_blocks * self.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}), "
                f"fewer than one sequence of max_model_len={self.max_model_len}: give it more memory "
                f"(kv_cache_memory, num_blocks, or gpu_memory_utilization on CUDA) or lower max_model_len")
        self.kv_cache = PagedKVCache(model_config.n_layer, num_blocks, self.block_size,
                                     model_config.n_kv_head, model_config.head_dim, self.dtype, self.device)
        # a CPU cache's pages are committed on first write: reuse the ones already written
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching,
                                          reuse_freed_first=self.device.type == "cpu")
        logger.info(describe_kv_cache(self.kv_cache, self.device))
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        decode_graphs = None
        if graphs:
            decode_graphs = DecodeGraphs(self.model, self.kv_cache, attention_backend.decode,
                                         config.max_num_seqs, self.max_model_len, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, attention_backend,
                                  Sampler(self.tokenizer.eos_token_ids), self.device, decode_graphs,
                                  StepTimer(self.device) if config.step_timing else None)
        self.requests: dict[str, Request] = {}
        # requests whose outputs the next step() returns (finished, or streamed and advanced)
        self._due: dict[str, Request] = {}
        self.stats = EngineStats()
        self._request_counter = itertools.count()
        self._seq_counter = itertools.count()
        self._seed_rng = random.Random(config.seed)

    # -- requests ---------------------------------------------------------------------

    @staticmethod
    def truncated_prompt(prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        k = params.truncate_prompt_tokens
        return prompt_token_ids if k is None else list(prompt_token_ids)[-k:]

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_type("sampling_params", params, SamplingParams, "a SamplingParams")
        prompt_token_ids = self.truncated_prompt(prompt_token_ids, params)
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if bad:
            raise TypeError(f"prompt token ids must be ints, got {bad[0]!r}")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of vocabulary: ids must be in "
                             f"[0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; it must be shorter than "
                             f"max_model_len={self.max_model_len} to leave room for output")
        for name in ("stop_token_ids", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{name} {bad} are out of vocabulary: ids must be in [0, {self.vocab_size})")

    def free_request_id(self, request_id: str | int | None) -> str:
        """`request_id` as a str, refused if a request holds it; None: the counter's next
        id that no request holds."""
        if request_id is None:
            request_id = str(next(self._request_counter))
            while request_id in self.requests:  # skip ids a user gave by hand
                request_id = str(next(self._request_counter))
        else:
            request_id = str(check_type("request_id", request_id, (str, int), "a str"))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return request_id

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None,
                    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY) -> str:
        """`output_kind` FINAL_ONLY: step() returns the request once, finished; CUMULATIVE:
        also at each step that adds tokens. The facade picks it (generate: always FINAL_ONLY)."""
        self.validate_prompt(prompt_token_ids, params)
        request_id = self.free_request_id(request_id)
        # numpy ints become Python ones
        prompt_token_ids = [int(t) for t in self.truncated_prompt(prompt_token_ids, params)]
        request = Request(request_id, prompt, prompt_token_ids, params)
        request.output_kind = output_kind
        if params.bad_words:
            logits_processors.prepare(request, self.tokenizer)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # the first token has no predecessor
        base_seed = self._seed_rng.getrandbits(63) if params.seed is None else params.seed
        for index in range(params.n):
            seed = xxhash.xxh64_intdigest(f"{base_seed}:{index}".encode()) >> 1  # fits int64
            seq = Sequence(next(self._seq_counter), request, index, list(prompt_token_ids), seed)
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request_id

    def new_sequence(self, request: Request, index: int, token_ids: list[int], seed: int) -> Sequence:
        """A sequence of `request` beyond those add_request made (beam search's forks)."""
        return Sequence(next(self._seq_counter), request, index, token_ids, seed)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks; returns its final output (finish_reason
        "abort" where it had not finished), or None for an unknown id."""
        self._due.pop(str(request_id), None)
        request = self.requests.pop(str(request_id), None)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.finished_time = time.time()
        return self.make_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._due) or self.scheduler.has_unfinished()

    # -- the step loop ----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return the outputs of requests that finished in it,
        and of streamed (CUMULATIVE) requests that got tokens in it."""
        step_start = time.perf_counter()
        with interrupts_held():
            scheduled = self.scheduler.schedule()
        if scheduled:
            result = self.runner.execute(scheduled)
            updates = self._decide(result)
            prompt_logprobs = [(request, self._new_prompt_logprobs(request, *logprobs))
                               for request, *logprobs in result.prompt_logprobs]
            with interrupts_held():
                self._commit(scheduled, result, updates, prompt_logprobs)
            if result.device_seconds is not None:
                self.stats.timed_steps += 1
                self.stats.step_host_seconds += time.perf_counter() - step_start
                self.stats.step_device_seconds += result.device_seconds
        elif self.scheduler.has_unfinished():
            raise RuntimeError("no request could be scheduled although some are waiting")
        # built before the list is emptied: an interrupt here returns them next step
        outputs = [self.make_output(request) for request in self._due.values()]
        self._due = {}
        return outputs

    def _decide(self, result: StepOutput) -> list[TokenUpdate | None]:
        """Per sampled row, what its token brings beyond itself (log-probs, the text where
        stop strings are watched, the end of its sequence), or None for a token that is
        only appended."""
        eos, max_model_len = self.tokenizer.eos_token_ids, self.max_model_len
        tokens = self._tokens(result)
        updates = [None] * len(tokens)
        for row, (item, token) in enumerate(zip(result.sampled_seqs, tokens)):
            seq = item.seq
            p, num_tokens = seq.params, len(seq.token_ids) + 1  # with this token
            # most rows are done here: nothing to record, and nothing _stop could stop at
            if (p.logprobs is not None or p.stop_strings or token in eos or token in p.stop_token_ids
                    or num_tokens - seq.num_prompt_tokens == p.max_tokens or num_tokens >= max_model_len):
                updates[row] = self._token_update(seq, row, result.sampled)
        return updates

    @staticmethod
    def _tokens(result: StepOutput) -> list[int]:
        return result.sampled.token_ids if result.sampled else []

    def _token_update(self, seq: Sequence, row: int, sampled) -> TokenUpdate:
        update = TokenUpdate(seq, sampled.token_ids[row])
        if seq.logprobs is not None:
            update.logprob = sampled.logprobs[row]
            update.logprob_entry = self._logprob_entry(
                update.token, update.logprob, sampled.ranks[row],
                sampled.top_ids[row] if sampled.top_ids else [],
                sampled.top_logprobs[row] if sampled.top_logprobs else [])
        update.finish = self._stop(seq, update)
        return update

    def _stop(self, seq: Sequence, update: TokenUpdate) -> tuple | None:
        """(finish_reason, stop_reason) if `update.token` ends `seq`, else None."""
        p, token = seq.params, update.token
        num_output_tokens = seq.num_output_tokens + 1
        if num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
            if p.stop_strings:
                update.text = self.tokenizer.decode(seq.output_token_ids + [token], p.skip_special_tokens)
                # the text of the first min_tokens tokens is never searched
                if num_output_tokens > p.min_tokens and (stop := self._stop_string(seq.text, update)):
                    return "stop", stop
        if num_output_tokens == p.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _stop_string(previous: str, update: TokenUpdate) -> str | None:
        """The first stop string that ends in the text this token added; cuts the text there."""
        p, text = update.seq.params, update.text
        # what was searched before cannot hold a stop string, except where a trailing
        # partial UTF-8 character (decoded as U+FFFD) has now become a real one
        searched = len(previous.rstrip("\ufffd"))
        hits = [(i, s) for s in p.stop_strings if (i := text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        update.text = text[:index + len(stop)] if p.include_stop_str_in_output else text[:index]
        return stop

    def _new_prompt_logprobs(self, request: Request, first_index: int, logprobs, ranks, top_ids,
                             top_lps) -> list[dict]:
        # prompt positions are computed in order; a recomputed chunk repeats what is known
        known = len(request.prompt_logprobs)
        return [self._logprob_entry(request.prompt_token_ids[first_index + i], logprobs[i], ranks[i],
                                    top_ids[i], top_lps[i])
                for i in range(known - first_index, len(logprobs))]

    def _commit(self, scheduled, result: StepOutput, updates: list[TokenUpdate],
                prompt_logprobs: list[tuple[Request, list[dict]]]) -> None:
        """Apply what the step decided: plain bookkeeping, nothing that decodes or computes."""
        self.scheduler.update(scheduled)
        self._update_stats(scheduled, result)
        for request, entries in prompt_logprobs:
            request.prompt_logprobs += entries
        now, final_only = time.time(), RequestOutputKind.FINAL_ONLY  # a local: enum lookups are slow
        for item, token, update in zip(result.sampled_seqs, self._tokens(result), updates):
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
        if update.logprob_entry is not None:
            seq.cumulative_logprob += update.logprob
            seq.logprobs.append(update.logprob_entry)
        if update.text is not None:
            seq.text = update.text
        if update.finish is not None:
            self.scheduler.finish(seq, *update.finish)
            if request.is_finished:
                request.finished_time = now
                del self.requests[request.request_id]
                self._due[request.request_id] = request

    def _update_stats(self, scheduled, result: StepOutput) -> None:
        stats = self.stats
        stats.steps += 1
        stats.forward_seconds += result.forward_seconds
        stats.computed_tokens += sum([s.num_new_tokens for s in scheduled])
        stats.generated_tokens += len(result.sampled_seqs)
        stats.preemptions = self.scheduler.num_preemptions
        stats.prompt_tokens = self.scheduler.admitted_prompt_tokens
        stats.cached_prompt_tokens = self.scheduler.cached_prompt_tokens
        stats.peak_used_blocks = max(stats.peak_used_blocks, self.block_manager.num_used_blocks)
        stats.peak_running_seqs = max(stats.peak_running_seqs, len(self.scheduler.running))

    def _logprob_entry(self, token, logprob, rank, top_ids, top_logprobs) -> dict[int, Logprob]:
        decode = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
        entry = {t: Logprob(lp, r + 1, decode(t)) for r, (t, lp) in enumerate(zip(top_ids, top_logprobs))}
        entry[token] = Logprob(logprob, rank, decode(token))
        return entry

    def make_output(self, request: Request) -> RequestOutput:
        completions = []
        for seq in request.sequences:
            p = seq.params
            text = seq.text if p.stop_strings and seq.finish_reason == "stop" and isinstance(seq.stop_reason, str) \
                else self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens) if p.detokenize else ""
            logprobs = None if seq.logprobs is None else list(seq.logprobs)  # a streamed copy stays as it was
            completions.append(CompletionOutput(
                seq.index, text, seq.output_token_ids, seq.cumulative_logprob, logprobs,
                seq.finish_reason, seq.stop_reason))
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, request.prompt_logprobs,
            completions, request.is_finished,
            RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
            max(request.sequences[0].num_cached_tokens, 0))
