"""Speculative decoding's speed-up: output tokens per second without and with guesses.

Two engines over the same model, one with `speculative_config` and one without, run
the same batches in turn (so that whatever else the machine is doing slows both alike),
at each batch size (over at least 8 prompts, run that many at a time), on two workloads:
- input-grounded: a passage (the model's own greedy writing after a speaker's name), a
  blank line, then the passage's first lines again, greedy: the continuation copies
  the passage, which prompt lookup finds;
- free writing: a speaker's name, sampled (temperature 0.8, seeded): little to look up.
With a draft model (`{"model": DIR, ...}`) the workloads are free writing only, greedy
and sampled at temperature 1 (seeded): a draft guesses any text, and at temperature > 0
it draws with the target's own noise. The run then also times the draft alone against
the target, to say how much cheaper per token it is.
The run needs nothing but the model.
Each figure is the best of `--rounds` runs (what other processes take from a run only
slows it), in output tokens per second of wall time and of the process's CPU time (on
a shared machine the second is the steadier; run with OMP_NUM_THREADS=1 for it to
count the same work both ways); the outputs of both
engines are checked equal, token for token. Acceptance rate and mean accepted length (accepted guesses + 1
per sequence step that checked guesses) are the speculative engine's.

    python -m benchmarks.speculative [--model models/shakespeare-d4] [--batch-sizes 1 8 64]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}']
    python -m benchmarks.speculative \
        --speculative-config '{"model": "models/shakespeare-d2-draft", "num_speculative_tokens": 4}'
"""

import argparse
import json
import time
from pathlib import Path

import torch

from microvllm import LLM, SamplingParams

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shakespeare-d4"
DEFAULT_CONFIG = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
SPEAKERS = ["OTHELLO.", "HAMLET.", "KING LEAR.", "PORTIA.", "ROSALIND.", "MACBETH.", "JULIET.", "PROSPERO."]
# the least ratio each should reach
TARGETS = {("input-grounded", 1): 2.0, ("input-grounded", 8): 1.3, ("greedy", 1): 1.5, ("temperature 1", 1): 1.5}
NGRAM_WORKLOADS = ("input-grounded", "free writing")
DRAFT_WORKLOADS = ("greedy", "temperature 1")  # free writing, as a draft model guesses it
FREE_WRITING_FLOOR = 0.95
MIN_PROMPTS = len(SPEAKERS)


def passages(llm: LLM, count: int, num_tokens: int) -> list[str]:
    """`count` passages of the model's own greedy writing, after speakers' names."""
    prompts = [f"{SPEAKERS[i % len(SPEAKERS)]}\n" for i in range(count)]
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    return [p + o.outputs[0].text for p, o in zip(prompts, llm.generate(prompts, params, use_tqdm=False))]


def workload(name: str, llm: LLM, batch_size: int, max_tokens: int) -> tuple[list[str], list[SamplingParams]]:
    if name == "input-grounded":
        texts = passages(llm, batch_size, 2 * max_tokens)
        prompts = [text + "\n\n" + text[:max(text.find("\n", len(text.split("\n")[0]) + 1), 16)] for text in texts]
        return prompts, [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)] * batch_size
    prompts = [f"{SPEAKERS[i % len(SPEAKERS)]}\n" for i in range(batch_size)]
    temperature = {"greedy": 0.0, "temperature 1": 1.0}.get(name, 0.8)
    return prompts, [SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens, ignore_eos=True)
                     for i in range(batch_size)]


def timed(llm: LLM, prompts: list[str], params: list[SamplingParams],
          batch_size: int) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, the process's CPU seconds, the output tokens) of the prompts, run
    `batch_size` at a time."""
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = []
    for first in range(0, len(prompts), batch_size):
        outputs += llm.generate(prompts[first:first + batch_size], params[first:first + batch_size], use_tqdm=False)
    return time.perf_counter() - wall, time.process_time() - cpu, [o.outputs[0].token_ids for o in outputs]


def decode_rates(llm: LLM, max_tokens: int, rounds: int) -> tuple[float, float]:
    """Output tokens per second of one greedy free-writing sequence at a time (batch 1),
    the best of `rounds`: of wall time, of the process's CPU time."""
    prompts, params = workload("greedy", llm, MIN_PROMPTS, max_tokens)
    timed(llm, prompts, params, 1)  # warm up
    runs = [timed(llm, prompts, params, 1) for _ in range(rounds)]
    return tuple(len(prompts) * max_tokens / min(run[clock] for run in runs) for clock in (0, 1))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--speculative-config", type=json.loads, default=DEFAULT_CONFIG)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    plain = LLM(args.model)
    spec = LLM(args.model, speculative_config=args.speculative_config)
    print(f"{args.model}, {spec.engine.device} ({cpu_name()}), {torch.get_num_threads()} threads; "
          f"speculative_config={json.dumps(args.speculative_config)}")
    draft_model = args.speculative_config.get("model")
    if draft_model is not None:
        draft = LLM(draft_model)
        # alternately, so that the machine's load slows both alike
        (target_wall, target_cpu), (draft_wall, draft_cpu) = (decode_rates(llm, args.max_tokens, args.rounds)
                                                              for llm in (plain, draft))
        print(f"alone at batch 1: target {target_wall:.1f} tok/s, draft {draft_wall:.1f} tok/s (wall); a target "
              f"token costs {draft_wall / target_wall:.2f}x a draft token (wall), {draft_cpu / target_cpu:.2f}x (CPU)")
        del draft
    print(f"{'':>21} {'wall time':^30} {'CPU time':^30}")
    print(f"{'workload':>15} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>6} "
          f"{'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>6} {'accept':>7} {'mean len':>8}  target (CPU time)")
    for name in NGRAM_WORKLOADS if draft_model is None else DRAFT_WORKLOADS:
        for batch_size in args.batch_sizes:
            # at least MIN_PROMPTS, so that a small batch does not stand or fall by one prompt
            prompts, params = workload(name, plain, max(batch_size, MIN_PROMPTS), args.max_tokens)
            # the passages' KV, cached while they were decoded, is not what a prefill computes
            # (in bfloat16 the two round differently): both engines start from the same cache
            plain.engine.reset_prefix_cache()
            timed(plain, prompts, params, batch_size), timed(spec, prompts, params, batch_size)  # warm both up
            stats = spec.engine.stats
            drafts, proposed, accepted = (stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens,
                                          stats.spec_decode_num_accepted_tokens)
            times = {"plain": [], "spec": []}
            for _ in range(args.rounds):
                *plain_seconds, want = timed(plain, prompts, params, batch_size)
                *spec_seconds, got = timed(spec, prompts, params, batch_size)
                if got != want:
                    raise RuntimeError(f"{name}, batch {batch_size}: speculative outputs differ from plain ones")
                times["plain"].append(plain_seconds)
                times["spec"].append(spec_seconds)
            num_tokens = sum(len(t) for t in want)
            # [wall, cpu] x [plain, spec] tokens per second
            rates = [[num_tokens / min(t[clock] for t in times[side]) for side in ("plain", "spec")]
                     for clock in (0, 1)]
            ratio = rates[1][1] / rates[1][0]
            drafts = stats.spec_decode_num_drafts - drafts
            proposed = stats.spec_decode_num_draft_tokens - proposed
            accepted = stats.spec_decode_num_accepted_tokens - accepted
            rate = accepted / proposed if proposed else 0.0
            mean_len = 1 + accepted / drafts if drafts else 0.0
            target = TARGETS.get((name, batch_size), FREE_WRITING_FLOOR if name != "input-grounded" else None)
            verdict = "" if target is None else f">= {target:.2f}x: {'met' if ratio >= target else 'NOT met'}"
            print(f"{name:>15} {batch_size:>5} " + " ".join(
                f"{plain_rate:>12.1f} {spec_rate:>11.1f} {spec_rate / plain_rate:>5.2f}x" for plain_rate, spec_rate in rates)
                + f" {rate:>7.2f} {mean_len:>8.2f}  {verdict}")


if __name__ == "__main__":
    main()
