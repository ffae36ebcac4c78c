"""Host overhead per decode step: the time a step spends outside the model forward.

A tiny random model (the forward costs little) runs `--num-seqs` sequences that all
decode together; for every step of decodes only, the step's wall time minus its
forward (and logits) time is the engine's own cost: scheduling, packing the batch,
sampling, appending tokens, stop checks and outputs. This is what caps throughput
once the forward is fast (on a GPU), so it is printed with its parts.

Times are this thread's CPU time (`time.thread_time`), so a busy machine that takes
the core away now and then does not inflate them; run it with OMP_NUM_THREADS=1 so
the forward's work is on this thread too.

    python -m benchmarks.host_overhead [--num-seqs 256] [--steps 64]
"""

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch

from microvllm import LLM, SamplingParams
from microvllm.model.config import ModelConfig

from .random_checkpoint import random_state_dict, save_checkpoint, tokenizer_with_vocab

TINY = dict(sequence_len=512, vocab_size=512, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
TARGET_MS = 1.0


def timed(step_parts: dict, name: str, fn):
    """fn, adding its CPU time to step_parts[name]."""
    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            step_parts[name] += time.thread_time() - start
    return wrapper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64, help="decode steps to time")
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args(argv)

    directory = tempfile.mkdtemp(prefix="host_overhead_")
    save_checkpoint(directory, 0, TINY, random_state_dict(ModelConfig(**TINY, era="A")),
                    tokenizer_with_vocab(TINY["vocab_size"]))
    llm = LLM(directory, max_num_seqs=args.num_seqs)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(None, [(i * 7 + j) % TINY["vocab_size"] for j in range(args.prompt_len)], params)
    while engine.scheduler.waiting:   # admit and prefill everyone first
        engine.step()
    engine.step()                     # one decode step to warm up

    step_parts = defaultdict(float)  # this step's CPU seconds by part
    scheduler, runner, processor = engine.scheduler, engine.runner, engine.output_processor
    scheduler.schedule = timed(step_parts, "schedule", scheduler.schedule)
    runner._prepare = timed(step_parts, "prepare", runner._prepare)
    runner.sampler = timed(step_parts, "sample", runner.sampler)
    processor.decide = timed(step_parts, "stop checks", processor.decide)
    scheduler.update = timed(step_parts, "commit: blocks, prefix cache", scheduler.update)
    processor.commit = timed(step_parts, "commit: tokens", processor.commit)
    processor.make_output = timed(step_parts, "outputs", processor.make_output)
    # the model's share, timed apart from the engine's parts
    runner._eager_forward = timed(step_parts, "forward", runner._eager_forward)
    runner.model.compute_logits = timed(step_parts, "logits", runner.model.compute_logits)
    parts, overheads, forwards = defaultdict(list), [], []
    for _ in range(args.steps):
        step_parts.clear()
        start = time.thread_time()
        engine.step()
        step_time = time.thread_time() - start
        forwards.append(step_parts.pop("forward") + step_parts.pop("logits"))
        overheads.append(step_time - forwards[-1])
        for name, seconds in step_parts.items():
            parts[name].append(seconds)

    ms = lambda values: 1e3 * statistics.median(values)
    print(f"{args.num_seqs} decoding sequences, {args.steps} steps, {torch.get_num_threads()} threads, "
          f"median CPU time per step:")
    print(f"  forward + logits: {ms(forwards):6.3f} ms")
    print(f"  host overhead:    {ms(overheads):6.3f} ms  (target <= {TARGET_MS} ms: "
          f"{'met' if ms(overheads) <= TARGET_MS else 'NOT met'})")
    for name, values in parts.items():
        print(f"    {name:30} {ms(values):6.3f} ms")


if __name__ == "__main__":
    main()
