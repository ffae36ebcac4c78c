"""LLMEngine: requests in, one scheduled forward per step, finished outputs out.

It implements the engine interface (interface.py), the only door its drivers use:
`add_request` queues a request the facade has checked; `step` schedules, runs the
model once and hands the sampled tokens to the output processor, which appends them,
applies the stop rules and returns the outputs due; `abort_request` drops a request
and frees its blocks at once; beam search holds sequences through `forks` (forks.py).

With speculative_config, a speculator (speculative/speculator.py) gives the scheduled
pure decodes guesses before the forward, which checks them in the same flat batch; the
output processor keeps those the model agrees with, and the speculator settles the
rest after the commit.

A step is all or nothing. Scheduling and the closing bookkeeping are short and hold
Ctrl-C back until they are done (`interrupts_held`); everything slow in between (the
forward, sampling, detokenising for stop strings and log-probs) only reads the
engine's state and decides. An exception there leaves the blocks that scheduling
reserved, which the next step's schedule reuses (blocks reserved for guesses go back
when that sequence's next guesses are settled, or when it ends): the engine carries on
as if the step had never started.
"""

import itertools
import logging
import random
import time

import torch
import xxhash

from ..model.sources import load_model_and_tokenizer
from ..model.weights import load_weights
from ..outputs import RequestOutput
from ..platform import platform_for
from ..sampling_params import RequestOutputKind, SamplingParams
from ..speculative.factory import make_proposer
from ..speculative.speculator import Speculator
from ..structured.grammars import Grammars
from . import logits_processors
from .block_manager import BlockManager
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .features import request_features
from .forks import SequenceForks
from .interface import Engine
from .interrupts import interrupts_held
from .kv_cache import PagedKVCache
from .memory import describe_kv_cache, num_kv_blocks
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Request, RequestIds, Sequence
from .stats import EngineStats, StepTimer

logger = logging.getLogger(__name__)


class LLMEngine(Engine):
    streams = True

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.resolve_device()
        self.platform = platform = platform_for(self.device)
        self.dtype = platform.runnable_dtype(config.resolve_dtype(platform.default_dtype()))
        platform.start(config.cpu_threads)
        attention_backend = platform.attention_backend(config.attention_backend, self.dtype)
        self.block_size = config.block_size or attention_backend.default_block_size
        if self.block_size % attention_backend.block_size_multiple:
            raise ValueError(f"block_size={self.block_size} is not supported by {attention_backend.name}: "
                             f"use a multiple of {attention_backend.block_size_multiple}, "
                             f"or attention_backend='sdpa'")
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model, config.tokenizer, config.step, config.revision, self.dtype, self.device,
            config.logit_softcap, max_positions=config.max_model_len)
        self.model = platform.prepare_model(self.model, attention_backend, config.quantization)
        model_config = self.model.config
        if self.tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {model_config.vocab_size}: wrong tokenizer for this checkpoint")
        self.max_model_len = config.max_model_len or model_config.sequence_len
        self.vocab_size = model_config.vocab_size

        graphs = platform.uses_decode_graphs(config.enforce_eager, attention_backend.name, self.max_model_len)
        num_blocks = num_kv_blocks(config, self.model, platform, self.dtype, self.max_model_len,
                                   self.block_size, attention_backend.decode if graphs else None)
        capacity = num_blocks * self.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}), "
                f"fewer than one sequence of max_model_len={self.max_model_len}: give it more memory "
                f"(kv_cache_memory, num_blocks, or gpu_memory_utilization on CUDA) or lower max_model_len")
        self.kv_cache = PagedKVCache(model_config.n_layer, num_blocks, self.block_size, model_config.n_kv_head,
                                     model_config.head_dim, self.dtype, self.device, platform.kv_pool)
        platform.prewrite_kv((self.kv_cache.k, self.kv_cache.v), PagedKVCache.bytes_per_block(
            model_config.n_layer, self.block_size, model_config.n_kv_head, model_config.head_dim, self.dtype))
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching,
                                          reuse_freed_first=platform.reuse_freed_blocks_first)
        logger.info(f"{config.model}: {str(self.dtype).removeprefix('torch.')} on {self.device}; "
                    + describe_kv_cache(self.kv_cache, platform))
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        decode_graphs = None
        if graphs:
            decode_graphs = DecodeGraphs(self.model, self.kv_cache, attention_backend.decode,
                                         config.max_num_seqs, self.max_model_len, self.device)
        sampler = Sampler(self.tokenizer.eos_token_ids, platform.argmax, platform.sampling_noise)
        self.runner = ModelRunner(self.model, self.kv_cache, attention_backend, sampler, self.device, decode_graphs,
                                  StepTimer(platform.device_clock) if config.step_timing else None)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler, self.max_model_len)
        speculative = config.speculative_config
        self.speculates = speculative is not None
        self.speculator = None if speculative is None else Speculator(
            make_proposer(speculative, self.tokenizer, self.dtype, self.device, platform),
            speculative.num_speculative_tokens, self.scheduler, self.max_model_len)
        self.grammars = Grammars(self.tokenizer)
        self.stats = EngineStats()
        self.stats.record_load(self.scheduler)  # the KV blocks in all, before the first step
        self._request_ids = RequestIds()
        self._seq_counter = itertools.count()
        self.forks = SequenceForks(self.scheduler, self.output_processor, self.kv_cache, self._seq_counter)
        self._seed_rng = random.Random(config.seed)

    # -- the engine interface (interface.py) ---------------------------------------------

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None,
                    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY) -> str:
        """Queue a request whose prompt the facade has checked (prompts.checked_prompt).

        `output_kind` FINAL_ONLY: step() returns the request once, finished; CUMULATIVE or
        DELTA: also at each step that adds tokens. The facade picks it."""
        request_id = self._request_ids.take(request_id, self.output_processor.requests)
        request = Request(request_id, prompt, prompt_token_ids, params)
        request.output_kind = output_kind
        if params.bad_words:
            logits_processors.prepare(request, self.tokenizer)
        request.features = request_features(params, output_kind, self.tokenizer, self.grammars)
        base_seed = self._seed_rng.getrandbits(63) if params.seed is None else params.seed
        for index in range(params.n):
            seed = xxhash.xxh64_intdigest(f"{base_seed}:{index}".encode()) >> 1  # fits int64
            seq = Sequence(next(self._seq_counter), request, index, list(prompt_token_ids), seed)
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.output_processor.add(request)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks; returns its final output (finish_reason
        "abort" where it had not finished), or None for an unknown id."""
        output = self.output_processor.abort(str(request_id))
        self.stats.record_load(self.scheduler)  # its blocks are free now, not after the next step
        return output

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_outputs() or self.scheduler.has_unfinished()

    def num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return the outputs of requests that finished in it,
        and of streamed requests that got tokens in it."""
        step_start = time.perf_counter()
        with interrupts_held():
            self.forks.copy_forked_blocks()
            scheduled = self.scheduler.schedule()
            guessing = bool(scheduled) and self.speculator is not None and self.speculator.add_guesses(scheduled)
        if scheduled:
            result = self.runner.execute(scheduled, guessing)
            decisions = self.output_processor.decide(result)
            with interrupts_held():
                self.scheduler.update(scheduled)
                self.output_processor.commit(result, decisions)
                self.stats.record_step(scheduled, result, self.scheduler, step_start)
                if guessing:
                    self.stats.record_guesses(self.speculator.settle(decisions.accepted))
                    self.stats.record_load(self.scheduler)
        elif self.scheduler.has_unfinished():
            raise RuntimeError("no request could be scheduled although some are waiting")
        return self.output_processor.take_outputs()

    # -- what an RL trainer adds: new policy weights between rollouts ----------------------

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new weights (nanochat's names) in place, then forget the prefix cache,
        whose KV the old weights computed. The KV cache and CUDA graphs are kept."""
        if self.has_unfinished_requests():
            raise ValueError(f"update_weights: finish or abort the {self.num_unfinished_requests()} "
                             "unfinished requests first: weights must not change under a running request")
        load_weights(self.model, state_dict)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; True when done (as vLLM's, which can refuse)."""
        return self.block_manager.reset_prefix_cache()
