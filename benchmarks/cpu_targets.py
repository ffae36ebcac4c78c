"""The engine's four CPU speed ratios, measured side by side on one workload.

Workload: 128 requests, prompt lengths uniform in 16..256 tokens, output lengths
uniform in 16..128, greedy, ignore_eos, the bundled model, default engine settings.

1. engine efficiency: time inside the model forward / end-to-end generate time;
2. batching: output tokens/s at the default batch / at max_num_seqs=1;
3. paged vs contiguous: generate time with 16-token blocks / with one max-length block
   per sequence, at the same batch;
4. KV cache vs none: the no-cache loop's time / the engine's.

    python -m benchmarks.cpu_targets [--model DIR] [--num-requests 128]
"""

import argparse
import random
import time

import torch

from microvllm import LLM, SamplingParams

from .no_cache import generate_without_cache
from .runs import contiguous_block_size

DEFAULT_MODEL = "models/shakespeare-d4"
TARGETS = {"engine efficiency": 0.85, "batching speedup": 8.0, "paged / contiguous time": 1.10,
           "KV cache speedup": 10.0}


def workload(num_requests: int, vocab_size: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(16, 256))] for _ in range(num_requests)]
    max_tokens = [rng.randint(16, 128) for _ in range(num_requests)]
    return prompts, max_tokens


def timed_generate(llm: LLM, prompts, max_tokens) -> tuple[float, int, float]:
    """(wall seconds, output tokens, forward seconds) of one generate call."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    forward_before = llm.engine.stats.forward_seconds
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return wall, sum(len(o.outputs[0].token_ids) for o in outputs), llm.engine.stats.forward_seconds - forward_before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    paged = LLM(args.model)
    prompts, max_tokens = workload(args.num_requests, paged.engine.vocab_size, args.seed)
    max_model_len = max(len(p) + m for p, m in zip(prompts, max_tokens))
    paged = LLM(args.model, max_model_len=max_model_len)
    contiguous = LLM(args.model, max_model_len=max_model_len, enable_prefix_caching=False,
                     block_size=contiguous_block_size(max_model_len))
    one_at_a_time = LLM(args.model, max_model_len=max_model_len, max_num_seqs=1)

    runs = {}
    for name, llm in (("paged", paged), ("contiguous", contiguous), ("max_num_seqs=1", one_at_a_time)):
        runs[name] = timed_generate(llm, prompts, max_tokens)
        wall, tokens, forward = runs[name]
        print(f"{name:>15}: {wall:7.2f} s  {tokens / wall:8.0f} out tok/s  forward {forward / wall:.1%} of wall")
    start = time.perf_counter()
    generate_without_cache(paged.engine.model, prompts, max_tokens, max_num_seqs=256,
                           max_model_len=max_model_len)
    no_cache_wall = time.perf_counter() - start
    print(f"{'no KV cache':>15}: {no_cache_wall:7.2f} s  {runs['paged'][1] / no_cache_wall:8.0f} out tok/s")

    wall, tokens, forward = runs["paged"]
    ratios = {
        "engine efficiency": forward / wall,
        "batching speedup": (tokens / wall) / (runs["max_num_seqs=1"][1] / runs["max_num_seqs=1"][0]),
        "paged / contiguous time": wall / runs["contiguous"][0],
        "KV cache speedup": no_cache_wall / wall,
    }
    print(f"\n{torch.get_num_threads()} threads, {args.num_requests} requests, {tokens} output tokens")
    for name, value in ratios.items():
        target = TARGETS[name]
        ok = value <= target if name.startswith("paged") else value >= target
        print(f"{name:>24}: {value:7.3f}  (target {'<=' if name.startswith('paged') else '>='} {target})"
              f"  {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
