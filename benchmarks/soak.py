"""Soak: thousands of short requests through one engine; nothing may leak or slow down.

Runs the requests in equal waves through one LLM and prints, per wave, the output
tokens/s, the process RSS and the KV blocks in use. At the end, blocks in use must be
back where they started, the RSS must have reached a plateau (the second half of the
waves grows it by at most --rss-allowance-mib: the first half meets the step sizes whose
kernels the process keeps), and the second half's best wave must run at least 90% as
fast as the first half's (best of each: other jobs on the machine only slow a wave down).

    python -m benchmarks.soak --num-requests 5000
"""

import argparse
import random
import sys
import time

from microvllm import LLM, SamplingParams

DEFAULT_MODEL = "models/shakespeare-d4"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="the LLM's dtype (auto: bfloat16 where the CPU has it)")
    parser.add_argument("--num-requests", type=int, default=5000)
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--rss-allowance-mib", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype)
    vocab = llm.engine.vocab_size
    rng = random.Random(args.seed)
    per_wave = args.num_requests // args.waves
    blocks_at_start = llm.engine.block_manager.num_used_blocks
    waves = []
    print(f"{'wave':>4} {'requests':>8} {'out tok/s':>10} {'RSS MiB':>8} {'blocks used':>11}")
    for wave in range(args.waves):
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(4, 32))] for _ in range(per_wave)]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(4, 16),
                                 seed=rng.randrange(1 << 30), ignore_eos=True) for _ in prompts]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        waves.append((tokens / elapsed, rss_mib(), llm.engine.block_manager.num_used_blocks))
        print(f"{wave:>4} {per_wave:>8} {waves[-1][0]:>10.0f} {waves[-1][1]:>8.1f} {waves[-1][2]:>11}")

    half = len(waves) // 2
    first_half, second_half = waves[:half], waves[half:]
    growth = waves[-1][1] - first_half[-1][1]
    speed_ratio = max(w[0] for w in second_half) / max(w[0] for w in first_half)
    checks = {
        "blocks in use back to start": waves[-1][2] == blocks_at_start,
        f"RSS over the second half {growth:+.1f} MiB within {args.rss_allowance_mib} MiB "
        f"(over the whole run {waves[-1][1] - waves[0][1]:+.1f})": growth <= args.rss_allowance_mib,
        f"best wave throughput, second half / first half {speed_ratio:.3f} >= 0.90": speed_ratio >= 0.90,
        "no request left unfinished": not llm.has_unfinished_requests(),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
