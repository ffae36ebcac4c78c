"""Soak: thousands of short requests through one engine; nothing may leak or slow down.

Runs the requests in ten equal waves through one LLM and prints, per wave, the output
tokens/s, the process RSS and the KV blocks in use. At the end, blocks in use and RSS
must be back where they were after the first wave (within --rss-allowance-mib), and
the last wave's throughput at least 90% of the first's (a faster last wave is fine).

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
    parser.add_argument("--num-requests", type=int, default=5000)
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--rss-allowance-mib", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    llm = LLM(args.model)
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

    first_speed, first_rss, _ = waves[0]
    last_speed, last_rss, last_blocks = waves[-1]
    checks = {
        "blocks in use back to start": last_blocks == blocks_at_start,
        f"RSS growth {last_rss - first_rss:+.1f} MiB within {args.rss_allowance_mib} MiB":
            last_rss - first_rss <= args.rss_allowance_mib,
        f"last/first wave throughput {last_speed / first_speed:.3f} >= 0.90 (only a slowdown fails)":
            last_speed / first_speed >= 0.90,
        "no request left unfinished": not llm.has_unfinished_requests(),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
