"""LLMEngine: requests in, one scheduled forward per step, finished outputs out.

`add_request` validates and queues a request; `step` schedules, runs the model once,
appends the sampled tokens, applies the stop rules and returns the requests that
finished; `abort_request` drops a request and frees its blocks at once.
"""

import itertools
import logging
import random
import time

import xxhash

from ..model.attention import resolve_attention_backend
from ..model.loader import load_model
from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .kv_cache import PagedKVCache
from .memory import describe_kv_cache, num_kv_blocks
from .model_runner import ModelRunner, StepOutput
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus
from .stats import EngineStats

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        attention_backend = resolve_attention_backend(config.attention_backend, self.device, self.dtype)
        self.block_size = config.block_size or attention_backend.default_block_size
        if self.block_size % attention_backend.block_size_multiple:
            raise ValueError(f"block_size={self.block_size} is not supported by {attention_backend.name}: "
                             f"use a multiple of {attention_backend.block_size_multiple}, "
                             f"or attention_backend='sdpa'")
        self.model = load_model(config.model, config.step, self.dtype, self.device,
                                config.logit_softcap, max_positions=config.max_model_len)
        self.tokenizer = Tokenizer.find(config.model, config.tokenizer)
        model_config = self.model.config
        if self.tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {model_config.vocab_size}: wrong tokenizer for this checkpoint")
        self.max_model_len = config.max_model_len or model_config.sequence_len
        self.vocab_size = model_config.vocab_size

        num_blocks = num_kv_blocks(config, self.model, self.device, self.dtype, self.max_model_len,
                                   self.block_size)
        capacity = num_blocks * self.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}), "
                f"fewer than one sequence of max_model_len={self.max_model_len}: give it more memory "
                f"(kv_cache_memory, num_blocks, or gpu_memory_utilization on CUDA) or lower max_model_len")
        self.kv_cache = PagedKVCache(model_config.n_layer, num_blocks, self.block_size,
                                     model_config.n_kv_head, model_config.head_dim, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        logger.info(describe_kv_cache(self.kv_cache, self.device))
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            decode_graphs = DecodeGraphs(self.model, self.kv_cache, attention_backend.decode,
                                         config.max_num_seqs, self.max_model_len, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, attention_backend,
                                  Sampler(self.tokenizer.eos_token_ids), self.device, decode_graphs)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._request_counter = itertools.count()
        self._seq_counter = itertools.count()
        self._seed_rng = random.Random(config.seed)

    # -- requests ---------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt_token_ids):
            bad = next(t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int))
            raise ValueError(f"prompt token ids must be ints, got {bad!r}")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of vocabulary: ids must be in "
                             f"[0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; it must be shorter than "
                             f"max_model_len={self.max_model_len} to leave room for output")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are out of vocabulary: ids must be in "
                             f"[0, {self.vocab_size})")

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        self.validate_prompt(prompt_token_ids, params)
        request_id = str(next(self._request_counter)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, prompt, list(prompt_token_ids), params)
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

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(str(request_id), None)
        if request is None:
            return
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step loop ----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return the outputs of requests that finished in it."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.has_unfinished():
                raise RuntimeError("no request could be scheduled although some are waiting")
            return []
        result = self.runner.execute(scheduled)
        self.scheduler.update(scheduled)
        self._update_stats(scheduled, result)
        self._record_prompt_logprobs(result)
        finished = []
        for request in self._append_sampled(result):
            if request.is_finished:
                request.finished_time = time.time()
                del self.requests[request.request_id]
                finished.append(self.make_output(request))
        return finished

    def _update_stats(self, scheduled, result: StepOutput) -> None:
        stats = self.stats
        stats.steps += 1
        stats.forward_seconds += result.forward_seconds
        stats.computed_tokens += sum(s.num_new_tokens for s in scheduled)
        stats.generated_tokens += len(result.sampled_seqs)
        stats.preemptions = self.scheduler.num_preemptions
        stats.prompt_tokens = self.scheduler.admitted_prompt_tokens
        stats.cached_prompt_tokens = self.scheduler.cached_prompt_tokens
        stats.peak_used_blocks = max(stats.peak_used_blocks, self.block_manager.num_used_blocks)
        stats.peak_running_seqs = max(stats.peak_running_seqs, len(self.scheduler.running))

    def _append_sampled(self, result: StepOutput) -> list[Request]:
        """Append each sampled token; return the requests that one of them finished.

        A request finishes only when its last unfinished sequence stops on a token, so
        looking at those alone keeps a step's cost off the many that go on.
        """
        now = time.time()
        touched = {}
        for row, item in enumerate(result.sampled_seqs):
            seq, sampled = item.seq, result.sampled
            token = sampled.token_ids[row]
            seq.token_ids.append(token)
            if seq.logprobs is not None:
                seq.cumulative_logprob += sampled.logprobs[row]
                seq.logprobs.append(self._logprob_entry(
                    token, sampled.logprobs[row], sampled.ranks[row],
                    sampled.top_ids[row] if sampled.top_ids else [],
                    sampled.top_logprobs[row] if sampled.top_logprobs else []))
            request = seq.request
            request.first_token_time = request.first_token_time or now
            self._check_stop(seq, token)
            if seq.status is SequenceStatus.FINISHED:
                touched[request.request_id] = request
        return list(touched.values())

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.request.params
        num_tokens = len(seq.token_ids)
        num_output_tokens = num_tokens - seq.num_prompt_tokens
        if num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                return self.scheduler.finish(seq, "stop")
            if token in p.stop_token_ids:
                return self.scheduler.finish(seq, "stop", token)
            if p.stop_strings and self._check_stop_strings(seq):
                return
        if num_output_tokens == p.max_tokens or num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence) -> bool:
        p = seq.params
        text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
        # only the tail can hold a stop string that was not there one token ago
        search_from = max(0, len(seq.text) - max(len(s) for s in p.stop_strings))
        seq.text = text
        hits = [(i, s) for s in p.stop_strings if (i := text.find(s, search_from)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = text[:index + len(stop)] if p.include_stop_str_in_output else text[:index]
        self.scheduler.finish(seq, "stop", stop)
        return True

    def _record_prompt_logprobs(self, result: StepOutput) -> None:
        for request, first_index, logprobs, ranks, top_ids, top_lps in result.prompt_logprobs:
            collected = request.prompt_logprobs
            for offset, logprob in enumerate(logprobs):
                index = first_index + offset
                if index == len(collected):  # a recomputed chunk repeats what is known
                    collected.append(self._logprob_entry(request.prompt_token_ids[index], logprob,
                                                         ranks[offset], top_ids[offset], top_lps[offset]))

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
                else self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
            completions.append(CompletionOutput(
                seq.index, text, seq.output_token_ids, seq.cumulative_logprob, seq.logprobs,
                seq.finish_reason, seq.stop_reason))
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, request.prompt_logprobs,
            completions, request.is_finished,
            RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
            max(request.sequences[0].num_cached_tokens, 0))
