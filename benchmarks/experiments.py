"""The experiments test_alpaca.py runs: which modes, with which settings, and their ratios.

- single: the paged engine once.
- compare: paged vs contiguous vs no-cache on the same prompts: the speedups (no-cache
  recomputes every sequence in full each step: minutes where paged takes seconds).
- memory: paged vs contiguous at one fixed KV memory budget, with room for as many
  sequences as there are prompts, so memory alone limits how many run at once.
- prefix-sharing: prompts that share a long prefix, prefix caching on vs off.
- data-parallel: one engine vs N replicas on Ray (each with cpu_threads threads on CPU),
  on the same prompts, which may share a prefix: the throughput and cached-token ratios
  (the best of two alternating rounds each).
Each returns the run summaries and a dict of named ratios, measured in the same run.
"""

from dataclasses import dataclass

from microvllm import SamplingParams
from microvllm.engine.config import EngineConfig

from .metrics import RunSummary, ratio
from .runs import mode_engine_args, run_engine, run_no_cache, run_replicas
from .workloads import BenchRequest

DEFAULT_MEMORY_BUDGET_SEQS = 8  # the memory experiment's budget, in max-length sequences
DATA_PARALLEL_ROUNDS = 2


@dataclass
class BenchSetup:
    model_dir: str
    tokenizer_dir: str | None
    requests: list[BenchRequest]
    params: list                  # SamplingParams per request
    engine_args: dict             # shared by every engine mode
    max_model_len: int
    ignore_eos: bool
    use_tqdm: bool = False
    data_parallel_size: int = 1
    cpu_threads: int | None = None  # per replica in data-parallel; None = an equal share


def _finished(summary: RunSummary) -> RunSummary:
    # a comparison takes minutes: say what each mode did as soon as it is done
    print(f"{summary.mode}: {summary.num_prompts} prompts, {summary.output_tokens:,} output tokens "
          f"in {summary.wall_s:.2f} s ({summary.output_tok_s:,.0f} output tok/s)", flush=True)
    return summary


def _engine(setup: BenchSetup, mode: str, **overrides) -> RunSummary:
    args = mode_engine_args(mode, {**setup.engine_args, **overrides}, setup.max_model_len)
    return _finished(run_engine(mode, setup.model_dir, setup.tokenizer_dir, setup.requests, setup.params,
                                args, setup.use_tqdm))


def warm_up(setup: BenchSetup) -> None:
    """A short untimed run, so the first timed mode does not pay the process's one-off costs."""
    few = setup.requests[:4]
    args = mode_engine_args("paged", setup.engine_args, setup.max_model_len)
    run_engine("warm-up", setup.model_dir, setup.tokenizer_dir, few,
               [SamplingParams(max_tokens=2, ignore_eos=True)] * len(few), args)


def single(setup: BenchSetup):
    return [_engine(setup, "paged")], {}


def compare(setup: BenchSetup):
    paged, contiguous = _engine(setup, "paged"), _engine(setup, "contiguous")
    max_num_seqs = setup.engine_args.get("max_num_seqs") or EngineConfig.max_num_seqs
    no_cache = _finished(run_no_cache(setup.model_dir, setup.tokenizer_dir, setup.requests, max_num_seqs,
                                      setup.max_model_len, setup.ignore_eos, setup.engine_args.get("device"),
                                      setup.use_tqdm))
    speedup = lambda a, b: ratio(a.output_tok_s, b.output_tok_s)
    return [paged, contiguous, no_cache], {
        "paged_vs_contiguous_speedup": speedup(paged, contiguous),
        "paged_vs_no_cache_speedup": speedup(paged, no_cache),
        "contiguous_vs_no_cache_speedup": speedup(contiguous, no_cache),
    }


def memory(setup: BenchSetup):
    overrides = {"max_num_seqs": setup.engine_args.get("max_num_seqs") or len(setup.requests)}
    if setup.engine_args.get("kv_cache_memory") is None:
        # no budget given: room for a few max-length sequences, the same bytes for both
        contiguous = _engine(setup, "contiguous", num_blocks=DEFAULT_MEMORY_BUDGET_SEQS, **overrides)
        overrides["kv_cache_memory"] = contiguous.kv_reserved_bytes
        paged = _engine(setup, "paged", **overrides)
    else:
        paged, contiguous = _engine(setup, "paged", **overrides), _engine(setup, "contiguous", **overrides)
    return [paged, contiguous], {
        "kv_budget_bytes": paged.kv_reserved_bytes,
        # when paged ran every prompt at once, the prompt count, not memory, was its limit
        "paged_limited_by_prompts": paged.peak_running_seqs == len(setup.requests),
        "max_running_seqs_ratio": ratio(paged.peak_running_seqs, contiguous.peak_running_seqs),
        "throughput_ratio": ratio(paged.output_tok_s, contiguous.output_tok_s),
        "kv_util_paged": paged.kv_util_at_peak,
        "kv_util_contiguous": contiguous.kv_util_at_peak,
    }


def prefill_tokens_computed(s: RunSummary) -> int:
    """Tokens computed other than feeding back generated tokens (one per output but the last)."""
    return s.computed_tokens - (s.output_tokens - s.num_prompts)


def prefix_sharing(setup: BenchSetup):
    on, off = _engine(setup, "prefix-cache-on"), _engine(setup, "prefix-cache-off")
    return [on, off], {
        "prefill_tokens_computed_on": prefill_tokens_computed(on),
        "prefill_tokens_computed_off": prefill_tokens_computed(off),
        "prefill_tokens_saved_ratio": ratio(prefill_tokens_computed(off), prefill_tokens_computed(on)),
        "throughput_ratio": ratio(on.output_tok_s, off.output_tok_s),
    }


def cached_prompt_tokens(s: RunSummary) -> float:
    return s.prefix_hit_rate * s.input_tokens


def data_parallel(setup: BenchSetup, rounds: int = DATA_PARALLEL_ROUNDS):
    """Alternating rounds of each, keeping each one's fastest: the others sharing the
    machine slow whichever runs while they are busy."""
    n = setup.data_parallel_size
    args = mode_engine_args("paged", setup.engine_args, setup.max_model_len)
    ones, replicas = [], []
    for _ in range(rounds):
        ones.append(_engine(setup, "paged"))
        replicas.append(run_replicas(f"{n} replicas", setup.model_dir, setup.tokenizer_dir, setup.requests,
                                     setup.params, args, n, setup.cpu_threads, setup.use_tqdm))
    one, many = (max(runs, key=lambda s: s.output_tok_s) for runs in (ones, replicas))
    return [one, many], {
        "throughput_ratio": ratio(many.output_tok_s, one.output_tok_s),
        "cached_prompt_tokens_one_engine": round(cached_prompt_tokens(one)),
        f"cached_prompt_tokens_{n}_replicas": round(cached_prompt_tokens(many)),
        "cached_prompt_tokens_ratio": ratio(cached_prompt_tokens(many), cached_prompt_tokens(one)),
    }


EXPERIMENTS = {"single": single, "compare": compare, "memory": memory, "prefix-sharing": prefix_sharing,
               "data-parallel": data_parallel}
