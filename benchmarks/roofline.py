"""How far the CPU engine is from this host's peaks: each step kind's time beside its roofline.

Peaks, measured here with the engine's thread count:
- matmul GFLOP/s of the model's own linear layers, called as the engine calls them (the
  loaded model's modules: F.linear in float32, oneDNN-packed weights in bfloat16 on CPUs
  with bfloat16 instructions), at decode batches of 1, 8, 64 and 256 rows and a prefill
  chunk; the best of them is the compute peak;
- memory bandwidth of a plain streaming read (a sum over an array far larger than the
  caches) and of a copy: what reading weights and KV could reach.

Then one workload runs through microvllm (a warm-up generate of the same shape first,
with other prompts) with every step timed; each step is a prefill (chunks only), a
decode (one token per sequence) or mixed. Per kind: the measured wall time, the part
spent in the model forward and logits, the rest (host: scheduling, packing, sampling,
outputs), and the roofline time max(FLOPs / compute peak, bytes / read bandwidth) from
the model shape and each step's tokens and context lengths, with roofline / measured.
With --vllm-python, vLLM runs the same workload (vs_vllm's worker) and its wall time is
set beside the workload's roofline too.

    python -m benchmarks.roofline --model 6x384 --workload w1 [--dtype bfloat16] [--threads 2]
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from microvllm import LLM, SamplingParams
from microvllm.cpu.linear import PackedLinear
from microvllm.model.gpt import GPT

from .cpu_targets import DEFAULT_MODEL
from .vs_vllm import MODELS, WORKLOADS, both_formats, cpu_features, in_subprocess, make_workload, write_nanochat

ROOFLINE_WORKLOADS = {  # name: the vs_vllm workload whose requests it runs (on --model's model)
    "w1": "32 prompts 8..128, 64 out",
    "w2": "128 prompts 16..256, 16..128 out",
    "long": "16 prompts 600..900, 96 out (long contexts)",
}
DECODE_ROWS = (1, 8, 64, 256)
BANDWIDTH_BYTES = 1 << 30  # far beyond any cache
MIN_TIMING_SECONDS = 0.2


def median_seconds(fn, min_seconds: float = MIN_TIMING_SECONDS, min_runs: int = 5) -> float:
    """Median wall time of fn() over at least min_runs calls and min_seconds, after one warm-up."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- peaks ------------------------------------------------------------------------------

def layer_linears(model: GPT) -> dict[str, nn.Module]:
    """One block's linear layers and the LM head, as the engine holds them (packed or not)."""
    block = model.transformer.h[0]
    linears = {name: module for name, module in block.named_modules() if isinstance(module, (nn.Linear, PackedLinear))}
    return {**linears, "lm_head": model.lm_head}


@torch.inference_mode()
def matmul_gflops(linears: dict[str, nn.Module], rows: int, dtype: torch.dtype) -> tuple[float, float]:
    """GFLOP/s of one block's linears together, and of the LM head, at `rows` input rows."""
    def rate(modules: list[nn.Module]) -> float:
        flops = seconds = 0.0
        for module in modules:
            x = torch.randn(rows, module.in_features, dtype=dtype)
            seconds += median_seconds(lambda: module(x))
            flops += 2 * rows * module.in_features * module.out_features
        return flops / seconds / 1e9
    return rate([m for name, m in linears.items() if name != "lm_head"]), rate([linears["lm_head"]])


def read_bandwidth() -> tuple[float, float]:
    """GB/s of a streaming read (a sum) and of a copy (bytes read plus bytes written)."""
    a = torch.ones(BANDWIDTH_BYTES // 4)
    b = torch.empty_like(a)
    read = BANDWIDTH_BYTES / median_seconds(lambda: a.sum(), min_seconds=1.0) / 1e9
    copy = 2 * BANDWIDTH_BYTES / median_seconds(lambda: b.copy_(a), min_seconds=1.0) / 1e9
    return read, copy


# -- the model's arithmetic ---------------------------------------------------------------

@dataclasses.dataclass
class ModelMath:
    """FLOPs and bytes of a step, from the model's shape."""
    n_layer: int
    layer_linear_params: int   # one block's linear weights
    lm_head_params: int
    q_dim: int                 # n_head * head_dim
    kv_dim: int                # n_kv_head * head_dim
    windows: list[int | None]  # per layer: the keys a query sees at most (None: all)
    element_bytes: int

    @classmethod
    def of(cls, model: GPT, linears: dict[str, nn.Module], dtype: torch.dtype) -> "ModelMath":
        c = model.config
        params = lambda m: m.in_features * m.out_features
        return cls(c.n_layer, sum(params(m) for name, m in linears.items() if name != "lm_head"),
                   params(linears["lm_head"]), c.n_head * c.head_dim, c.n_kv_head * c.head_dim,
                   list(model.window_sizes), torch.empty((), dtype=dtype).element_size())

    def step(self, chunks: list[tuple[int, int]], sampled_rows: int) -> tuple[float, float]:
        """(FLOPs, bytes) of a step that runs `chunks` (new tokens, tokens already in the
        cache) and computes logits for `sampled_rows`: linears, causal attention, weights
        read once, each layer's visible keys and values read once and the new ones written."""
        tokens = sum(new for new, _ in chunks)
        flops = 2 * (tokens * self.n_layer * self.layer_linear_params + sampled_rows * self.lm_head_params)
        kv_tokens = 0
        for window in self.windows:
            for new, cached in chunks:
                # keys seen by the new tokens' queries: QK^T and PV, 2 FLOPs a multiply-add each
                if window is None:
                    seen = new * cached + new * (new + 1) // 2
                else:
                    seen = sum(min(cached + i + 1, window) for i in range(new))
                flops += 4 * self.q_dim * seen
                kv_tokens += cached + new if window is None else min(cached, window) + new
        weights = self.n_layer * self.layer_linear_params + self.lm_head_params
        bytes_moved = self.element_bytes * (weights + 2 * self.kv_dim * kv_tokens)
        return flops, bytes_moved


# -- one workload, every step timed ---------------------------------------------------------

@dataclasses.dataclass
class StepRecord:
    kind: str
    tokens: int
    seconds: float          # step() wall time
    forward_seconds: float  # model forward and logits
    roofline_seconds: float


def step_kind(chunks: list[tuple[int, int]]) -> str:
    decodes = sum(new == 1 and cached > 0 for new, cached in chunks)
    return "decode" if decodes == len(chunks) else "prefill" if decodes == 0 else "mixed"


def run_workload(llm: LLM, math: ModelMath, peak_gflops: float, bandwidth_gbs: float,
                 prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[StepRecord], float, int]:
    """Generate with every engine step recorded; returns the steps, the wall time and the
    output tokens."""
    engine, records = llm.engine, []
    execute, step = engine.runner.execute, engine.step
    current = {}

    def recorded_execute(scheduled):
        current["chunks"] = [(s.num_new_tokens, s.seq.num_computed_tokens) for s in scheduled]
        result = execute(scheduled)
        current["forward_seconds"], current["sampled"] = result.forward_seconds, len(result.sampled_seqs)
        return result

    def recorded_step():
        current.clear()
        start = time.perf_counter()
        outputs = step()
        seconds = time.perf_counter() - start
        if current:
            flops, bytes_moved = math.step(current["chunks"], current["sampled"])
            roofline = max(flops / (peak_gflops * 1e9), bytes_moved / (bandwidth_gbs * 1e9))
            records.append(StepRecord(step_kind(current["chunks"]), sum(n for n, _ in current["chunks"]),
                                      seconds, current["forward_seconds"], roofline))
        return outputs

    engine.runner.execute, engine.step = recorded_execute, recorded_step
    try:
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        engine.runner.execute, engine.step = execute, step
    return records, wall, sum(len(o.outputs[0].token_ids) for o in outputs)


def print_steps(records: list[StepRecord], wall: float, output_tokens: int) -> float:
    """The per-kind table; returns the workload's roofline seconds."""
    by_kind = defaultdict(list)
    for record in records:
        by_kind[record.kind].append(record)
    print("| steps | count | tokens | measured s | forward s | host s | roofline s | roofline / measured "
          "| roofline / forward |\n|---|---|---|---|---|---|---|---|---|")
    rows = [(kind, by_kind[kind]) for kind in ("prefill", "mixed", "decode") if by_kind[kind]] + [("all", records)]
    for kind, steps in rows:
        measured, forward = sum(s.seconds for s in steps), sum(s.forward_seconds for s in steps)
        roofline = sum(s.roofline_seconds for s in steps)
        print(f"| {kind} | {len(steps)} | {sum(s.tokens for s in steps):,} | {measured:.3f} | {forward:.3f} "
              f"| {measured - forward:.3f} ({(measured - forward) / measured:.0%}) | {roofline:.3f} "
              f"| {roofline / measured:.2f} | {roofline / forward:.2f} |")
    print(f"generate wall {wall:.2f} s ({wall - sum(s.seconds for s in records):.2f} s outside step()), "
          f"{output_tokens / wall:,.0f} output tok/s")
    return sum(s.roofline_seconds for s in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="6x384", choices=("bundled", *MODELS),
                        help=f"bundled = {DEFAULT_MODEL}; the others are vs_vllm's random era-A shapes")
    parser.add_argument("--workload", default="w1", choices=ROOFLINE_WORKLOADS)
    parser.add_argument("--dtype", help="microvllm dtype (default: its own default for this CPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the engine's own choice)")
    parser.add_argument("--prefill-rows", type=int, default=2048, help="rows of the prefill-chunk matmul peak")
    parser.add_argument("--vllm-python", help="also time vLLM on the workload (random models only)")
    parser.add_argument("--dir", help="where to write the random checkpoint (default: a temporary dir)")
    args = parser.parse_args(argv)

    root = Path(args.dir or tempfile.mkdtemp(prefix="roofline_"))
    if args.model == "bundled":
        model_dir = Path(DEFAULT_MODEL)
    elif args.vllm_python:
        model_dir, hf_dir = both_formats(root / args.model, args.model, args.vllm_python)
    else:
        model_dir = root / args.model / "nanochat"
        if not (model_dir / "meta_000000.json").exists():
            write_nanochat(model_dir, MODELS[args.model])
    llm = LLM(str(model_dir), dtype=args.dtype, cpu_threads=args.threads)
    model, dtype = llm.engine.model, llm.engine.dtype
    threads = torch.get_num_threads()
    print(f"{os.cpu_count()} CPUs ({cpu_features()}), {threads} torch threads, {str(dtype).removeprefix('torch.')}, "
          f"model {args.model} ({model.config.n_layer} layers x {model.config.n_embd}, "
          f"vocab {model.config.vocab_size})")

    linears = layer_linears(model)
    print("\n| rows | one block's linears GFLOP/s | LM head GFLOP/s |\n|---|---|---|")
    peak = 0.0
    for rows in (*DECODE_ROWS, args.prefill_rows):
        block_rate, head_rate = matmul_gflops(linears, rows, dtype)
        peak = max(peak, block_rate, head_rate)
        print(f"| {rows} | {block_rate:.1f} | {head_rate:.1f} |")
    read, copy = read_bandwidth()
    print(f"compute peak {peak:.1f} GFLOP/s (the best above); streaming read {read:.1f} GB/s, copy {copy:.1f} GB/s")

    name = ROOFLINE_WORKLOADS[args.workload]
    _, num_requests, prompt_lens, output_lens = WORKLOADS[name]
    vocab_size = model.config.vocab_size
    prompts, max_tokens = make_workload(num_requests, prompt_lens, output_lens, vocab_size)
    warmup_prompts, warmup_max_tokens = make_workload(num_requests, prompt_lens, output_lens, vocab_size, seed=1)
    math = ModelMath.of(model, linears, dtype)
    run_workload(llm, math, peak, read, warmup_prompts, warmup_max_tokens)
    records, wall, output_tokens = run_workload(llm, math, peak, read, prompts, max_tokens)
    print(f"\nworkload {args.workload} ({name}), microvllm:")
    roofline = print_steps(records, wall, output_tokens)
    if args.vllm_python and args.model != "bundled":
        workload_file = root / f"roofline_{args.workload}.json"
        workload_file.write_text(json.dumps(dict(
            prompts=prompts, max_tokens=max_tokens, warmup_prompts=warmup_prompts,
            warmup_max_tokens=warmup_max_tokens)))
        result = in_subprocess(args.vllm_python, "vllm", hf_dir, workload_file, str(dtype).removeprefix("torch."))
        vllm_wall = output_tokens / result["tok_s"]
        print(f"vLLM ({result['dtype']}, {result['threads']} threads): wall {vllm_wall:.2f} s, "
              f"{result['tok_s']:,.0f} output tok/s; "
              f"roofline / measured {roofline / vllm_wall:.2f} (microvllm {roofline / wall:.2f}, the same "
              f"roofline: microvllm's schedule)")


if __name__ == "__main__":
    main()
