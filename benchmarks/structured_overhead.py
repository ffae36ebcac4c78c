"""Structured outputs' cost per decode step: a batch of running sequences, half of them
held to a JSON schema, against the same batch with none constrained.

Two engines over the same model hold the two batches, and their decode steps
alternate, so that whatever else the machine is doing slows both alike. Every sequence
samples (temperature 1.0); the schema asks for more tokens than are timed and the
unconstrained sequences ignore EOS, so both batches stay whole. Times are the process's
CPU time, all threads counted (xgrammar fills bitmasks in threads of its own): run it
with OMP_NUM_THREADS=1. Each figure is the median decode step.

By default the model is a small random one with nanochat's vocabulary size, 65,536
(the bitmask's cost grows with the vocabulary); `--model DIR` times another.

    python -m benchmarks.structured_overhead [--model DIR] [--num-seqs 64] [--steps 96]
"""

import argparse
import statistics
import tempfile
import time

import torch

from microvllm import LLM, SamplingParams, StructuredOutputsParams
from microvllm.model.config import ModelConfig

from .random_checkpoint import random_state_dict, save_checkpoint, tokenizer_with_vocab

NANOCHAT_VOCAB = dict(sequence_len=1024, vocab_size=65536, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
TARGET_OVERHEAD = 0.15
# a list of records far longer than the steps timed: the constrained sequences never finish
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 100, "items": {
        "type": "object",
        "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                       "count": {"type": "integer", "minimum": 0, "maximum": 99},
                       "kind": {"enum": ["noun", "verb", "other"]}},
        "required": ["word", "count", "kind"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}


def start_batch(llm: LLM, num_constrained: int, num_seqs: int, max_tokens: int) -> None:
    """Add `num_seqs` sequences, the first `num_constrained` of them held to SCHEMA, and
    prefill them all."""
    plain = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, max_tokens=max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for i in range(num_seqs):
        llm.engine.add_request(None, llm.tokenizer.encode(f"Record {i} as JSON:"),
                               constrained if i < num_constrained else plain)
    while llm.engine.scheduler.waiting:
        llm.engine.step()
    llm.engine.step()  # one decode step to warm up


def timed_step(llm: LLM) -> float:
    start = time.process_time()
    llm.engine.step()
    return time.process_time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint dir (default: a random one with nanochat's vocab size)")
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=96, help="decode steps timed in each batch")
    args = parser.parse_args(argv)

    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix="structured_overhead_")
        save_checkpoint(model, 0, NANOCHAT_VOCAB, random_state_dict(ModelConfig(**NANOCHAT_VOCAB)),
                        tokenizer_with_vocab(NANOCHAT_VOCAB["vocab_size"]))
    plain_llm, mixed_llm = (LLM(model, max_num_seqs=args.num_seqs) for _ in range(2))
    start_batch(plain_llm, 0, args.num_seqs, args.steps + 8)
    start_batch(mixed_llm, args.num_seqs // 2, args.num_seqs, args.steps + 8)
    plain, mixed = [], []
    for _ in range(args.steps):
        plain.append(timed_step(plain_llm))
        mixed.append(timed_step(mixed_llm))
    if any(len(llm.engine.scheduler.running) != args.num_seqs for llm in (plain_llm, mixed_llm)):
        raise RuntimeError("a sequence finished while timed: raise the schema's minItems or lower --steps")
    plain_ms, mixed_ms = (1e3 * statistics.median(t) for t in (plain, mixed))
    overhead = mixed_ms / plain_ms - 1
    print(f"{args.num_seqs} decoding sequences, vocab {plain_llm.engine.vocab_size}, {torch.get_num_threads()} "
          f"threads, median CPU time per decode step over {args.steps} steps:")
    print(f"  none constrained:            {plain_ms:8.2f} ms")
    print(f"  half held to a JSON schema:  {mixed_ms:8.2f} ms")
    print(f"  overhead: {100 * overhead:+.1f}%  (target <= {100 * TARGET_OVERHEAD:.0f}%: "
          f"{'met' if overhead <= TARGET_OVERHEAD else 'NOT met'})")


if __name__ == "__main__":
    main()
