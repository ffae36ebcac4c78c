"""Benchmark microvllm on Alpaca instructions (or synthetic prompts): throughput, latency, KV memory.

    python test_alpaca.py                                  # Alpaca from the hub, paged engine
    python test_alpaca.py --dataset-path alpaca.json       # a local Alpaca-style file
    python test_alpaca.py --synthetic --prompt-len-range 16 256 --output-len-range 16 128 --compare
    python test_alpaca.py --synthetic --memory-experiment  # PagedAttention's memory claim
    python test_alpaca.py --synthetic --prefix-sharing     # prefix caching on a shared prefix
    python test_alpaca.py --synthetic --data-parallel-size 2 --cpu-threads 1  # 2 replicas vs 1 engine

Prints a table per run (and the ratios between modes), appends one row per run to
--csv, and writes everything to --output-json when asked. Plot the CSV with
`python -m benchmarks.plot benchmark_results.csv --out plots/`.
"""

import argparse
import json
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

from benchmarks.experiments import EXPERIMENTS, BenchSetup, warm_up
from benchmarks.metrics import format_bytes, parse_size, summary_table
from benchmarks.results_csv import append_runs
from benchmarks.runs import model_sequence_len, sampling_params
from benchmarks.workloads import (HF_ALPACA, BenchRequest, DatasetUnavailableError, alpaca_prompt,
                                  few_shot_text, load_alpaca_file, load_hf_alpaca, random_tokens,
                                  synthetic_requests, with_shared_prefix)
from microvllm.engine.config import EngineConfig
from microvllm.cpu.threads import apply_cpu_threads
from microvllm.model.attention import ATTENTION_BACKENDS
from microvllm.tokenizer import Tokenizer

__test__ = False  # a script, not a pytest module

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shakespeare-d4"
TRAIN_HINT = "build it with `python models/train_demo.py --stage all --out models/shakespeare-d4`"
FEW_SHOT_EXAMPLES = 4  # Alpaca records forming the shared prefix of --prefix-sharing


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model and engine")
    model.add_argument("--model", "--model-dir", dest="model_dir", metavar="DIR",
                       default=str(DEFAULT_MODEL_DIR),
                       help="nanochat checkpoint dir (default: the bundled demo model)")
    model.add_argument("--tokenizer-dir", help="dir holding tokenizer.pkl (default: found beside the model)")
    model.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    model.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda and on CPUs "
                                       "with bfloat16 instructions, AVX-512 BF16 or AMX; float32 on other CPUs)")
    model.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
    model.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    model.add_argument("--step-timing", action="store_true",
                       help="report host and device ms per step (CUDA events on GPU, wall time on CPU)")
    model.add_argument("--max-num-seqs", type=int,
                       help="sequences running at once (default: the engine's; the memory "
                            "experiment: the number of prompts, so memory is the limit)")
    model.add_argument("--block-size", type=int,
                       help="paged KV block size in tokens (default: the attention backend's, 16 or 256)")
    model.add_argument("--kv-cache-memory", type=size_argument,
                       help="KV cache bytes, e.g. 256M or 1G (default: the engine's)")
    model.add_argument("--max-model-len", type=int, help="default: the model's sequence_len")
    model.add_argument("--cpu-threads", type=int,
                       help="torch threads on cpu (default: $OMP_NUM_THREADS if set, else the cores "
                            "this process may use, less one and less those other processes keep busy; "
                            "with --data-parallel-size, per replica)")
    model.add_argument("--data-parallel-size", type=int, default=1,
                       help="N > 1: one engine vs N replicas on Ray, same prompts (with "
                            "--prefix-sharing: on the shared-prefix prompts)")

    data = p.add_argument_group("workload")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset-path", help="local Alpaca-style .json / .jsonl / .parquet "
                                               "(default: tatsu-lab/alpaca through `datasets`)")
    source.add_argument("--synthetic", action="store_true", help="random token prompts")
    data.add_argument("--num-prompts", type=int, default=128)
    data.add_argument("--prompt-len-range", type=int, nargs=2, default=(16, 256), metavar=("LOW", "HIGH"),
                      help="synthetic prompt lengths in tokens, <|bos|> included")
    data.add_argument("--output-len-range", type=int, nargs=2, metavar=("LOW", "HIGH"),
                      help="synthetic max_tokens per request (default: --max-tokens for all)")
    data.add_argument("--chat", action="store_true", help="wrap Alpaca prompts in nanochat's chat format")
    data.add_argument("--prefix-len", type=int, default=192,
                      help="tokens of the shared prefix in --prefix-sharing")
    data.add_argument("--seed", type=int, default=0)

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=-1)
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="always generate max_tokens (synthetic prompts always do)")

    experiment = p.add_argument_group("experiment (default: one paged run)").add_mutually_exclusive_group()
    experiment.add_argument("--compare", action="store_true",
                            help="paged vs contiguous vs no-KV-cache on the same prompts; no-cache "
                                 "recomputes every sequence in full each step, so it is slow: "
                                 "minutes where paged takes seconds")
    experiment.add_argument("--memory-experiment", action="store_true",
                            help="paged vs contiguous at one KV memory budget: sequences at once")
    experiment.add_argument("--prefix-sharing", action="store_true",
                            help="a long shared prefix, prefix caching on vs off")

    out = p.add_argument_group("output")
    out.add_argument("--csv", default="benchmark_results.csv", help="results CSV to append to ('' = none)")
    out.add_argument("--output-json", help="write the summaries and ratios to this JSON file")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="a progress bar per mode, on stderr (default: on)")
    return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
    for name in ("num_prompts", "max_tokens", "prefix_len", "block_size", "max_num_seqs", "cpu_threads",
                 "data_parallel_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.data_parallel_size > 1 and (args.compare or args.memory_experiment):
        parser.error("--data-parallel-size compares one engine with replicas; it does not combine "
                     "with --compare or --memory-experiment")
    if args.synthetic and args.chat:
        parser.error("--chat wraps text prompts; it does not apply to --synthetic token prompts")


def load_text_prompts(args) -> tuple[list[str], list[dict]]:
    if args.dataset_path:
        records = load_alpaca_file(args.dataset_path)
    else:
        print(f"loading {HF_ALPACA} from the hub (offline: use --dataset-path or --synthetic)",
              file=sys.stderr)
        records = load_hf_alpaca(args.num_prompts + FEW_SHOT_EXAMPLES)
    return [alpaca_prompt(r) for r in records[:args.num_prompts]], records


def build_requests(args, tokenizer: Tokenizer) -> list[BenchRequest]:
    ordinary_tokens = min(tokenizer.special_ids)  # nanochat puts its special tokens last
    if args.synthetic:
        output_range = args.output_len_range or (args.max_tokens, args.max_tokens)
        requests = synthetic_requests(args.num_prompts, tuple(args.prompt_len_range), tuple(output_range),
                                      ordinary_tokens, tokenizer.bos_id, args.seed)
        prefix = random_tokens(args.prefix_len, ordinary_tokens, args.seed + 1)
    else:
        prompts, records = load_text_prompts(args)
        encode = (lambda p: tokenizer.render_chat([{"role": "user", "content": p}])) if args.chat \
            else tokenizer.encode
        requests = [BenchRequest(encode(p), args.max_tokens) for p in prompts]
        prefix = tokenizer.encode(few_shot_text(records[:FEW_SHOT_EXAMPLES]), prepend_bos=False)
    return with_shared_prefix(requests, prefix[:args.prefix_len]) if args.prefix_sharing else requests


def experiment_name(args) -> str:
    return ("data-parallel" if args.data_parallel_size > 1 else "compare" if args.compare else "memory" if args.memory_experiment
            else "prefix-sharing" if args.prefix_sharing else "single")


def print_report(experiment: str, setup: BenchSetup, summaries, ratios: dict, skipped: int) -> None:
    print(f"\n{experiment}: {len(setup.requests)} prompts, model {setup.model_dir}, "
          f"max_model_len {setup.max_model_len}"
          + (f" ({skipped} prompts too long for max_model_len skipped)" if skipped else ""))
    print(summary_table(summaries))
    if ratios.get("paged_limited_by_prompts"):
        print("note: paged ran every prompt at once, so its ratio is capped by the prompt count; "
              "use more prompts or a smaller --kv-cache-memory to make memory the limit")
    for name, value in ratios.items():
        if value is None or isinstance(value, bool):
            continue
        shown = format_bytes(value) if name.endswith("_bytes") else \
            f"{value * 100:.1f}%" if name.startswith("kv_util") else \
            f"{value}" if isinstance(value, int) else f"{value:.2f}x"
        print(f"{name.replace('_', ' ')}: {shown}")


def prepare(args) -> tuple[BenchSetup, int]:
    """The run's setup, and how many prompts were skipped for not fitting max_model_len."""
    max_model_len = args.max_model_len or model_sequence_len(args.model_dir)
    requests = build_requests(args, Tokenizer.find(args.model_dir, args.tokenizer_dir))
    fitting = [r for r in requests if len(r.prompt_token_ids) < max_model_len]
    if not fitting:
        raise ValueError(f"every prompt is at least max_model_len={max_model_len} tokens long; "
                         "use shorter prompts or a larger --max-model-len")
    engine_args = {"cpu_threads": args.cpu_threads, "device": args.device, "dtype": args.dtype, "block_size": args.block_size,
                   "kv_cache_memory": args.kv_cache_memory, "seed": args.seed,
                   "attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager,
                   "step_timing": args.step_timing}
    if args.max_num_seqs is not None:
        engine_args["max_num_seqs"] = args.max_num_seqs
    ignore_eos = args.ignore_eos or args.synthetic
    params = sampling_params(fitting, args.temperature, args.top_k, ignore_eos, args.seed)
    setup = BenchSetup(args.model_dir, args.tokenizer_dir, fitting, params, engine_args, max_model_len,
                       ignore_eos, args.progress, args.data_parallel_size, args.cpu_threads)
    return setup, len(requests) - len(fitting)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    experiment = experiment_name(args)
    if Path(args.model_dir) == DEFAULT_MODEL_DIR and not any(DEFAULT_MODEL_DIR.glob("model_*.pt")):
        parser.error(f"the bundled model is missing from {DEFAULT_MODEL_DIR}; {TRAIN_HINT}")
    try:
        device = str(EngineConfig(model=args.model_dir, device=args.device).resolve_device())
        if device == "cpu":  # the no-cache mode builds no engine: it gets the engines' threads here
            threads = apply_cpu_threads(args.cpu_threads)
            if args.data_parallel_size == 1:  # else it is per replica, and None shares the cores out
                args.cpu_threads = threads
        setup, skipped = prepare(args)
        warm_up(setup)
        summaries, ratios = EXPERIMENTS[experiment](setup)
    # a missing file, bad input (a value of the wrong type, too), refused settings
    except (FileNotFoundError, ValueError, TypeError, DatasetUnavailableError) as e:
        parser.error(str(e))

    print_report(experiment, setup, summaries, ratios, skipped)
    if args.csv:
        append_runs(args.csv, summaries, uuid.uuid4().hex[:8], experiment, args.model_dir, device)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "experiment": experiment, "device": device, "max_model_len": setup.max_model_len,
            "skipped_prompts": skipped, "args": vars(args),
            "runs": [asdict(s) for s in summaries], "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
