"""One benchmark run: a workload through one engine configuration, or the no-cache loop.

Engine modes:
- paged: the engine as shipped, small blocks (16 tokens by default), prefix caching on;
- contiguous: one block of max_model_len (rounded up to a power of two) reserved per
  sequence, no prefix caching: what a KV cache without paging pre-allocates;
- prefix-cache-on / prefix-cache-off: paged, with prefix caching on or off.
The no-cache mode runs `no_cache.generate_without_cache` on the same model weights.
`run_replicas` runs the paged engine as N data-parallel replicas on Ray.
"""

import time
from dataclasses import fields

from tqdm.auto import tqdm

from microvllm import LLM, SamplingParams
from microvllm.engine.config import EngineConfig
from microvllm.platform import platform_for
from microvllm.engine.stats import EngineStats
from microvllm.model.loader import find_checkpoint, load_model, read_model_config_dict
from microvllm.tokenizer import Tokenizer

from .kv_probe import KVUsageProbe
from .metrics import RequestRecord, RunSummary, summarize
from .no_cache import generate_without_cache
from .workloads import BenchRequest


def model_sequence_len(model_dir: str) -> int:
    _, meta_path, _ = find_checkpoint(model_dir)
    return read_model_config_dict(meta_path)["sequence_len"]


def contiguous_block_size(max_model_len: int) -> int:
    return 1 << (max_model_len - 1).bit_length()


def mode_engine_args(mode: str, engine_args: dict, max_model_len: int) -> dict:
    """Engine keyword arguments of `mode`, on top of the run's shared `engine_args`."""
    args = dict(engine_args, max_model_len=max_model_len)
    if mode == "contiguous":
        args.update(block_size=contiguous_block_size(max_model_len), enable_prefix_caching=False)
    elif mode == "prefix-cache-off":
        args.update(enable_prefix_caching=False)
    elif mode not in ("paged", "prefix-cache-on"):
        raise ValueError(f"unknown engine mode {mode!r}")
    return args


def sampling_params(requests: list[BenchRequest], temperature: float, top_k: int, ignore_eos: bool,
                    seed: int) -> list[SamplingParams]:
    # a seed per request makes sampled runs repeat exactly in every mode
    return [SamplingParams(temperature=temperature, top_k=top_k, max_tokens=r.max_tokens,
                           ignore_eos=ignore_eos, seed=seed + i if temperature > 0 else None)
            for i, r in enumerate(requests)]


def run_engine(mode: str, model_dir: str, tokenizer_dir: str | None, requests: list[BenchRequest],
               params: list[SamplingParams], engine_args: dict, use_tqdm: bool = False) -> RunSummary:
    llm = LLM(model_dir, tokenizer_dir, **engine_args)
    probe = KVUsageProbe(llm.engine)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    start = time.perf_counter()
    named_bar = lambda **kwargs: tqdm(**{**kwargs, "desc": mode})
    outputs = llm.generate(prompts, params, use_tqdm=named_bar if use_tqdm else False)
    wall_s = time.perf_counter() - start
    records = [RequestRecord(len(o.prompt_token_ids), len(o.outputs[0].token_ids), o.metrics)
               for o in outputs]
    stats = llm.engine.stats
    return summarize(mode, records, wall_s, stats.computed_tokens, stats.peak_running_seqs,
                     stats, probe.usage())


def run_no_cache(model_dir: str, tokenizer_dir: str | None, requests: list[BenchRequest],
                 max_num_seqs: int, max_model_len: int, ignore_eos: bool,
                 device: str | None = None, use_tqdm: bool = False) -> RunSummary:
    config = EngineConfig(model=model_dir, device=device)
    torch_device = config.resolve_device()
    model = load_model(model_dir, dtype=config.resolve_dtype(platform_for(torch_device).default_dtype()), device=torch_device)
    eos = frozenset() if ignore_eos else Tokenizer.find(model_dir, tokenizer_dir).eos_token_ids
    start = time.perf_counter()
    result = generate_without_cache(model, [r.prompt_token_ids for r in requests],
                                    [r.max_tokens for r in requests], max_num_seqs, max_model_len, eos,
                                    tqdm(total=len(requests), desc="no-cache", disable=not use_tqdm,
                                         dynamic_ncols=True))
    wall_s = time.perf_counter() - start
    records = [RequestRecord(len(r.prompt_token_ids), len(o.token_ids), o.metrics)
               for r, o in zip(requests, result.outputs)]
    return summarize("no-cache", records, wall_s, result.computed_tokens, result.peak_batch_size)


def run_replicas(mode: str, model_dir: str, tokenizer_dir: str | None, requests: list[BenchRequest],
                 params: list[SamplingParams], engine_args: dict, data_parallel_size: int,
                 cpu_threads: int | None, use_tqdm: bool = False) -> RunSummary:
    """The paged engine as `data_parallel_size` replicas; replica start-up is not timed."""
    import ray  # the distributed extra; LLM names it when missing

    started_ray = not ray.is_initialized()
    if started_ray:  # a local cluster with a small object store: prompts and outputs are small
        ray.init(object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    llm = LLM(model_dir, tokenizer_dir, data_parallel_size=data_parallel_size,
              cpu_threads_per_replica=cpu_threads, **engine_args)
    try:
        # warm every replica on prompts shorter than a block, so the prefix cache stays empty
        bos = requests[0].prompt_token_ids[0]
        llm.generate([{"prompt_token_ids": [bos, 1 + i]} for i in range(4 * data_parallel_size)],
                     SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        before = llm.engine.stats
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params,
                               use_tqdm=use_tqdm)
        wall_s = time.perf_counter() - start
        after = llm.engine.stats
    finally:
        llm.engine.shutdown()
        if started_ray:
            ray.shutdown()
    # the timed run's counters only; its peaks are the whole life's (warm-up peaks are lower)
    stats = EngineStats(**{f.name: getattr(after, f.name) - (0 if f.name.startswith("peak")
                                                              else getattr(before, f.name))
                           for f in fields(EngineStats)})
    records = [RequestRecord(len(o.prompt_token_ids), len(o.outputs[0].token_ids), o.metrics)
               for o in outputs]
    return summarize(mode, records, wall_s, stats.computed_tokens, stats.peak_running_seqs, stats)
