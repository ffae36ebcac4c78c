"""The engine's GPU throughput targets, on a d20-sized model, with and without CUDA graphs.

Workload: a random-weight nanochat of d20 shape (era A: 20 layers, n_embd 1280, 10
heads, 10 KV heads, vocab 65536, sequence_len 2048, about 560M parameters) in
bfloat16; 256 requests with prompt and output lengths drawn uniformly from 100..1024
tokens, greedy, ignore_eos. It runs once with CUDA graphs (the default) and once with
`enforce_eager=True`, each after a warm-up, and reports for each:

1. output tokens/s of the workload (target: >= 10,000 with CUDA graphs on an H100),
   and the ratio of the two;
2. the KV cache: blocks, block size, bytes, and the share of GPU memory in use once
   the engine has started;
3. decode memory-bandwidth utilisation at batch 64 and 256 (see decode_bandwidth.py).

    python -m benchmarks.gpu_targets [--checkpoint-dir DIR] [--output-json FILE]

The random checkpoint (about 1.1 GB) is written on the first run and reused after.
`--shape tiny` runs every step on a toy model, in seconds on a CPU.
"""

import argparse
import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from microvllm import LLM, SamplingParams
from microvllm.engine.config import EngineConfig
from microvllm.platform import platform_for
from microvllm.model.config import ModelConfig
from microvllm.tokenizer import Tokenizer

from .decode_bandwidth import DecodeMeasurement, measure_decode, peak_bandwidth_gb_s, synchronize
from .metrics import format_bytes, format_table
from .random_checkpoint import random_state_dict, save_checkpoint, tokenizer_with_vocab
from .workloads import BenchRequest, synthetic_requests


@dataclass(frozen=True)
class Shape:
    model_config: dict            # nanochat's meta model_config
    prompt_lens: tuple[int, int]  # the workload's ranges, inclusive
    output_lens: tuple[int, int]
    decode_batches: tuple[int, ...]
    decode_prompt_len: int        # context the decode measurement starts from
    decode_steps: int


SHAPES = {
    "d20": Shape(dict(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280),
                 (100, 1024), (100, 1024), (64, 256), 1024, 64),
    "tiny": Shape(dict(sequence_len=256, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                  (8, 32), (8, 32), (4, 16), 32, 4),
}
ERA = "A"             # the published nanochat checkpoints (d20, d32, d34) are era A
STEP = 0
MODES = (("cuda graphs", False), ("eager", True))
WARMUP_MAX_TOKENS = 16
DECODE_WARMUP_STEPS = 4
TARGET_OUTPUT_TOK_S = 10_000


def ensure_checkpoint(directory: Path, shape: Shape) -> Path:
    """Write the random checkpoint into `directory`, unless it is already there."""
    meta = directory / f"meta_{STEP:06d}.json"
    if meta.is_file():
        found = json.loads(meta.read_text()).get("model_config")
        if found != shape.model_config:
            raise ValueError(f"{directory} holds a checkpoint of another shape ({found}); "
                             "give --checkpoint-dir a new directory")
        return directory
    print(f"writing a random checkpoint to {directory}")
    state = random_state_dict(ModelConfig(**shape.model_config, era=ERA), dtype=torch.bfloat16)
    return save_checkpoint(directory, STEP, shape.model_config, state,
                           tokenizer_with_vocab(shape.model_config["vocab_size"]))


@dataclass
class ModeResult:
    mode: str
    wall_s: float
    input_tokens: int
    output_tokens: int
    output_tok_s: float
    kv_blocks: int
    block_size: int
    kv_cache_bytes: int
    gpu_memory_in_use: float | None   # after start-up; None off CUDA
    decode: list[DecodeMeasurement]


def release_engine_memory(device: torch.device, baseline: int, slack: int = 64 * 2**20) -> None:
    """After the last reference to an engine is gone: give its memory back to the card and
    check that it came back, since the next engine sizes its KV cache from what is free."""
    gc.collect()  # engines hold reference cycles (graphs' closures over the model)
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device) - baseline
    if held > slack:
        raise RuntimeError(f"{format_bytes(held)} of GPU memory is still allocated after an engine was "
                           "released; something still references it")


def generate(llm: LLM, requests: list[BenchRequest]) -> tuple[float, int]:
    """(wall seconds, output tokens) of one greedy, ignore_eos generate call."""
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    synchronize(llm.engine.device)
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
    synchronize(llm.engine.device)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_mode(mode: str, enforce_eager: bool, args, shape: Shape, requests: list[BenchRequest],
             warmup: list[BenchRequest], peak_gb_s: float | None) -> ModeResult:
    llm = LLM(args.checkpoint_dir, device=args.device, dtype=args.dtype, enforce_eager=enforce_eager)
    engine, cache = llm.engine, llm.engine.kv_cache
    memory_in_use = None
    if engine.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(engine.device)
        memory_in_use = 1 - free / total
    generate(llm, warmup)
    wall, output_tokens = generate(llm, requests)
    # seeds of their own: no decode prompt may hit the prefix cache of an earlier run
    decode = [measure_decode(llm, batch, shape.decode_prompt_len, shape.decode_steps, DECODE_WARMUP_STEPS,
                             peak_gb_s, seed=args.seed + 2 + i) for i, batch in enumerate(shape.decode_batches)]
    return ModeResult(mode, wall, sum(len(r.prompt_token_ids) for r in requests), output_tokens,
                      output_tokens / wall, cache.num_blocks, cache.block_size, cache.k.nbytes + cache.v.nbytes,
                      memory_in_use, decode)


def table(results: list[ModeResult]) -> str:
    def row(label, show):
        return [label] + [show(r) for r in results]
    rows = [row("wall", lambda r: f"{r.wall_s:.2f} s"),
            row("output tokens", lambda r: f"{r.output_tokens:,}"),
            row("output tok/s", lambda r: f"{r.output_tok_s:,.0f}"),
            row("KV blocks x block size", lambda r: f"{r.kv_blocks:,} x {r.block_size}"),
            row("KV cache", lambda r: format_bytes(r.kv_cache_bytes))]
    if results[0].gpu_memory_in_use is not None:
        rows.append(row("GPU memory in use after start", lambda r: f"{r.gpu_memory_in_use:.1%}"))
    for i, d in enumerate(results[0].decode):
        label = f"decode batch {d.batch_size}"
        rows += [row(f"{label}: mean context", lambda r: f"{r.decode[i].mean_context:,.0f}"),
                 row(f"{label}: step", lambda r: f"{r.decode[i].step_s * 1e3:.2f} ms"),
                 row(f"{label}: bytes read / step", lambda r: format_bytes(r.decode[i].weight_bytes
                                                                         + r.decode[i].kv_bytes)),
                 row(f"{label}: bandwidth", lambda r: f"{r.decode[i].bandwidth_gb_s:,.1f} GB/s")]
        if d.utilisation is not None:
            rows.append(row(f"{label}: of peak bandwidth", lambda r: f"{r.decode[i].utilisation:.1%}"))
    return format_table(["metric"] + [r.mode for r in results], rows)


def build_requests(shape: Shape, tokenizer: Tokenizer, num_requests: int, seed: int):
    """The timed requests, and warm-up requests with other prompts and short outputs."""
    ordinary = min(tokenizer.special_ids)  # nanochat puts its special tokens last
    make = lambda seed: synthetic_requests(num_requests, shape.prompt_lens, shape.output_lens, ordinary,
                                           tokenizer.bos_id, seed)
    # other prompts than the timed ones, so the timed run gets no prefix-cache hits from them
    warmup = [BenchRequest(r.prompt_token_ids, min(r.max_tokens, WARMUP_MAX_TOKENS)) for r in make(seed + 1)]
    return make(seed), warmup


def print_report(args, shape: Shape, device_name: str, dtype: str, results: list[ModeResult],
                 peak_gb_s: float | None) -> dict:
    """Print the table and verdicts; return them for --output-json."""
    graphs, eager = results
    ratio = graphs.output_tok_s / eager.output_tok_s
    met = graphs.output_tok_s >= TARGET_OUTPUT_TOK_S
    config = shape.model_config
    print(f"\n{args.shape} (era {ERA}, {config['n_layer']} layers, n_embd {config['n_embd']}, "
          f"vocab {config['vocab_size']}) on {device_name}, {dtype}, {args.num_requests} requests, "
          f"prompts {shape.prompt_lens[0]}..{shape.prompt_lens[1]} and outputs "
          f"{shape.output_lens[0]}..{shape.output_lens[1]} tokens\n")
    print(table(results))
    no_graphs = "" if graphs.gpu_memory_in_use is not None else " (no CUDA here: both ran eagerly)"
    print(f"\ncuda graphs / eager output tok/s: {ratio:.2f}x{no_graphs}")
    print(f"target (d20 on an H100, cuda graphs): >= {TARGET_OUTPUT_TOK_S:,} output tok/s: "
          f"{'met' if met else 'NOT met'}")
    print(f"peak bandwidth: {f'{peak_gb_s:,.0f} GB/s' if peak_gb_s else 'unknown here (give --peak-bandwidth)'}")
    return dict(shape=args.shape, era=ERA, model_config=config, device=device_name, dtype=dtype,
                num_requests=args.num_requests, seed=args.seed, prompt_lens=shape.prompt_lens,
                output_lens=shape.output_lens, peak_bandwidth_gb_s=peak_gb_s,
                modes=[asdict(r) for r in results], graphs_over_eager=ratio,
                target_output_tok_s=TARGET_OUTPUT_TOK_S, target_met=met)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="d20")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the random checkpoint is written or reused "
                             "(default: microvllm-random/SHAPE in the temp dir)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 or auto (bf16 on cuda)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-bandwidth", type=float, default=None,
                        help="peak memory bandwidth in GB/s (default: known for H100, H200, A100 80GB)")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.num_requests < 1:
        parser.error("--num-requests must be >= 1")
    shape = SHAPES[args.shape]
    args.checkpoint_dir = args.checkpoint_dir or Path(tempfile.gettempdir()) / "microvllm-random" / args.shape
    try:  # as the engine will, and before a bad flag costs a checkpoint write
        engine_config = EngineConfig(str(args.checkpoint_dir), device=args.device, dtype=args.dtype)
        device = engine_config.resolve_device()
        dtype = str(engine_config.resolve_dtype(platform_for(device).default_dtype())).removeprefix("torch.")
    except ValueError as e:
        parser.error(str(e))
    ensure_checkpoint(args.checkpoint_dir, shape)
    requests, warmup = build_requests(shape, Tokenizer.from_dir(args.checkpoint_dir / "tokenizer"),
                                      args.num_requests, args.seed)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak_gb_s = args.peak_bandwidth or peak_bandwidth_gb_s(device)
    results = []
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for mode, enforce_eager in MODES:
        results.append(run_mode(mode, enforce_eager, args, shape, requests, warmup, peak_gb_s))
        release_engine_memory(device, baseline)
    report = print_report(args, shape, device_name, dtype, results, peak_gb_s)
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
