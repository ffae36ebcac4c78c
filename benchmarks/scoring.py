"""Scoring (prompt log-probs) on the CPU: microvllm against vLLM and nanochat, side by side.

Evaluation harnesses score a model by the log-probs it gives to known continuations, not
by generating. The workload: the random nanochat model of vs_vllm.py (6 layers x 384,
era A; `--shape d20` for nanochat's d20), float32 on every engine; 40 random contexts of
150..400 tokens, each with 4 continuations of 5..20 tokens: 160 prompts, each a context
and one continuation. Each engine first scores a workload of the same shape with other
tokens (a warm-up), then the timed one; the engines run one at a time.

(a) served, as lm-eval's `local-completions` model sends loglikelihood requests: POST
    /v1/completions with token-id prompts, `echo: true`, `logprobs: 1`, `max_tokens: 1`,
    `temperature: 0`, --batch-size prompts a request, the longest first, --concurrency
    requests in flight; microvllm's server against vLLM's, each at its defaults.
(b) offline, as lm-eval's `vllm` model scores: `LLM.generate` on token prompts with
    `SamplingParams(prompt_logprobs=1, max_tokens=1, temperature=0, detokenize=False)`.
(c) with --nanochat-src, CORE: microvllm's `evaluate_core` against nanochat's own
    `evaluate_task` (imported from the checkout) on each task of a random bundle
    (core_bundle.py), the same era-E checkpoint of the shape, both in float32.

Prints prompt tokens scored a second, the ratios, the CPU (model, vector extensions) and
the threads each engine computed on (those busy for at least a quarter of the timed
pass). Checks: microvllm's served log-probs equal its offline ones bit for bit where
both get the same batches in the same order (the warm-up, served a request at a time),
up to float32 rounding where the server's engine stepped while a request's prompts arrived;
microvllm's CORE accuracies equal nanochat's; it exits 1 if either fails. It prints the
largest log-prob difference from vLLM's.

    python -m benchmarks.scoring --vllm-python /path/to/vllm-venv/bin/python --nanochat-src ~/nanochat
    python -m benchmarks.scoring --quick     # 16 prompts, 8 CORE examples a task: a smoke run

vLLM lives in a virtualenv of its own (see docs/benchmarks.md); without --vllm-python
only microvllm runs (a) and (b). nanochat's dependencies must import here.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "scoring"
# (contexts, continuations per context, context lengths, continuation lengths)
WORKLOAD = (40, 4, (150, 400), (5, 20))
QUICK_WORKLOAD = (4, 4, (150, 400), (5, 20))
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4"}  # GiB of KV cache; unset, vLLM takes a share of the free memory
SERVER_START_S = 600  # vLLM compiles its model at start-up
# where the server's engine steps while a request's prompts are still arriving, its
# batches differ from offline's, and float32 sums with them, in the last bits
ROUNDING = 1e-5
CORE_EXAMPLES, QUICK_CORE_EXAMPLES = 100, 8  # per task of core_bundle's four


def scoring_prompts(contexts: int, per_context: int, context_lens: tuple[int, int],
                    continuation_lens: tuple[int, int], vocab_size: int, seed: int) -> list[list[int]]:
    """`contexts` random contexts, each followed by `per_context` random continuations."""
    rng = random.Random(seed)
    tokens = lambda lens: [rng.randrange(vocab_size) for _ in range(rng.randint(*lens))]
    prompts = []
    for _ in range(contexts):
        context = tokens(context_lens)
        prompts += [context + tokens(continuation_lens) for _ in range(per_context)]
    return prompts


def request_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompts' indices as lm-eval's local-completions groups them into requests: the
    longest prompts first, `batch_size` to a request."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# -- offline: one engine in a process of its own (python -m benchmarks.scoring --worker) --

def offline_ours(model_dir: str, workload: dict, dtype: str) -> dict:
    import torch
    from microvllm import LLM, SamplingParams
    llm = LLM(model_dir, dtype=dtype)
    result = timed_offline(lambda prompts: prompt_logprobs(llm, SamplingParams, prompts), workload)
    return dict(result, dtype=str(llm.engine.dtype).removeprefix("torch."), torch_threads=torch.get_num_threads())


def offline_vllm(model_dir: str, workload: dict, dtype: str) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    for name, value in VLLM_ENV.items():
        os.environ.setdefault(name, value)
    import torch
    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, skip_tokenizer_init=True, seed=0, dtype=dtype)
    result = timed_offline(lambda prompts: prompt_logprobs(llm, SamplingParams, prompts), workload)
    return dict(result, dtype=str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
                torch_threads=torch.get_num_threads())


def prompt_logprobs(llm, sampling_params: type, prompts: list[list[int]]) -> list[list[float]]:
    """Each prompt's token log-probs from its second token on, scored as lm-eval's vllm model
    scores (microvllm's LLM and SamplingParams, or vLLM's)."""
    params = sampling_params(prompt_logprobs=1, max_tokens=1, temperature=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[entry[token].logprob for entry, token in zip(o.prompt_logprobs[1:], p[1:])]
            for o, p in zip(outputs, prompts)]


def timed_offline(score, workload: dict) -> dict:
    """The warm-up, a generate call per served request's batch, one after another (its
    log-probs are `check`); then the timed workload, all in one generate call."""
    from .local_server import busy_threads, thread_cpu_seconds
    warmup = workload["warmup_prompts"]
    check = [[] for _ in warmup]
    for batch in workload["warmup_batches"]:
        for i, logprobs in zip(batch, score([warmup[i] for i in batch])):
            check[i] = logprobs
    before, start = thread_cpu_seconds(os.getpid()), time.perf_counter()
    logprobs = score(workload["prompts"])
    wall = time.perf_counter() - start
    return dict(tok_s=sum(map(len, workload["prompts"])) / wall, logprobs=logprobs, check=check,
                threads=busy_threads(before, thread_cpu_seconds(os.getpid()), wall))


# -- served: lm-eval's local-completions requests ----------------------------------------

async def score_served(url: str, prompts: list[list[int]], batches: list[list[int]],
                       concurrency: int) -> list[list[float]]:
    """Each prompt's token log-probs (from its second token on), through /v1/completions as
    lm-eval's local-completions sends loglikelihood requests: a request per batch,
    `concurrency` of them in flight."""
    import httpx
    logprobs: list[list[float]] = [[] for _ in prompts]
    in_flight = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, batch: list[int]) -> None:
        body = {"model": SERVED_NAME, "prompt": [prompts[i] for i in batch], "temperature": 0, "max_tokens": 1,
                "logprobs": 1, "seed": 1234, "echo": True}
        async with in_flight:
            response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
        for choice in response.json()["choices"]:
            # the echoed prompt's log-probs (None for its first token), then the generated token's
            logprobs[batch[choice["index"]]] = choice["logprobs"]["token_logprobs"][1:-1]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        await asyncio.gather(*(one(client, batch) for batch in batches))
    return logprobs


def run_served(command: list[str], port: int, env: dict, log_file: Path, workload: dict, args) -> dict:
    """Start a server; the warm-up through it a request at a time (its log-probs are `check`:
    a fresh engine given the same batches in the same order as offline, so the same sums);
    then the timed workload, `args.concurrency` requests in flight."""
    from .local_server import busy_threads, running, thread_cpu_seconds
    prompts = workload["prompts"]
    with running(command, port, REPO, env, log_file, SERVER_START_S) as (server, url):
        check = asyncio.run(score_served(url, workload["warmup_prompts"], workload["warmup_batches"], 1))
        before, start = thread_cpu_seconds(server.pid), time.perf_counter()
        logprobs = asyncio.run(score_served(url, prompts, workload["batches"], args.concurrency))
        wall = time.perf_counter() - start
        threads = busy_threads(before, thread_cpu_seconds(server.pid), wall)
    return dict(tok_s=sum(map(len, prompts)) / wall, logprobs=logprobs, check=check, threads=threads,
                dtype=args.dtype)


def server_command(engine: str, port: int, nanochat_dir: Path, hf_dir: Path | None, args) -> tuple[list[str], dict]:
    """The command that starts `engine`'s server at its defaults but the dtype, and its environment."""
    if engine == "microvllm":
        return [sys.executable, "-m", "microvllm.serve", str(nanochat_dir), "--dtype", args.dtype,
                "--served-model-name", SERVED_NAME, "--log-level", "warning", "--port", str(port)], dict(os.environ)
    return [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--dtype",
            args.dtype, "--served-model-name", SERVED_NAME, "--port", str(port)], {**VLLM_ENV, **os.environ}


# -- (a) and (b), engine by engine ------------------------------------------------------

def write_workload(root: Path, args) -> tuple[dict, Path]:
    """The timed prompts and the warm-up's, each split into served requests, and the JSON
    file the offline workers read them from."""
    from .vs_vllm import MODELS
    contexts, per_context, context_lens, continuation_lens = QUICK_WORKLOAD if args.quick else WORKLOAD
    make = lambda seed: scoring_prompts(contexts, per_context, context_lens, continuation_lens,
                                        MODELS[args.shape]["vocab_size"], seed)
    workload = {"prompts": make(0), "warmup_prompts": make(1)}
    workload |= {name: request_batches(workload[prompts], args.batch_size)
                 for name, prompts in (("batches", "prompts"), ("warmup_batches", "warmup_prompts"))}
    workload_file = root / ("workload_quick.json" if args.quick else "workload.json")
    workload_file.write_text(json.dumps(workload))
    print(f"{len(workload['prompts'])} prompts, {sum(map(len, workload['prompts'])):,} tokens; "
          f"served: {args.batch_size} prompts a request, {args.concurrency} requests in flight", flush=True)
    return workload, workload_file


def run_scoring(root: Path, args) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(a) and (b): per engine, its runs served and its runs offline, the order alternating by round."""
    from . import local_server
    from .vs_vllm import MODELS, both_formats, in_subprocess, write_nanochat
    if args.vllm_python:
        nanochat_dir, hf_dir = both_formats(root / args.shape, args.shape, args.vllm_python)
    else:
        nanochat_dir, hf_dir = root / args.shape / "nanochat", None
        if not (nanochat_dir / "meta_000000.json").exists():
            write_nanochat(nanochat_dir, MODELS[args.shape])
    workload, workload_file = write_workload(root, args)
    pythons = {"microvllm": (sys.executable, "ours", nanochat_dir)}
    if args.vllm_python:
        pythons["vLLM"] = (args.vllm_python, "vllm", hf_dir)
    served, offline = {e: [] for e in pythons}, {e: [] for e in pythons}
    for r in range(args.rounds):
        order = list(pythons) if r % 2 == 0 else list(pythons)[::-1]
        for engine in order:
            port = local_server.free_port()
            command, env = server_command(engine, port, nanochat_dir, hf_dir, args)
            served[engine].append(run_served(command, port, env, root / f"{engine}-server.log", workload, args))
            print(f"  served  | {engine:9} round {r}: {served[engine][-1]['tok_s']:8,.0f} tok/s", flush=True)
        for engine in order:
            python, worker, model_dir = pythons[engine]
            offline[engine].append(in_subprocess(python, worker, model_dir, workload_file, args.dtype,
                                                 module="benchmarks.scoring"))
            print(f"  offline | {engine:9} round {r}: {offline[engine][-1]['tok_s']:8,.0f} tok/s", flush=True)
    return served, offline


# -- CORE: microvllm's evaluate_core against nanochat's evaluate_task ----------------------

def core_ours(model_dir: str, workload: dict, dtype: str) -> dict:
    import torch
    from microvllm import LLM
    from microvllm.core_eval import evaluate_core
    llm = LLM(model_dir, dtype=dtype)
    tokens, generate = [], llm.generate  # per evaluate_core call, the prompt tokens it scores

    def counted(prompts, *rest, **kwargs):
        tokens[-1] += sum(len(p["prompt_token_ids"]) for p in prompts)
        return generate(prompts, *rest, **kwargs)
    llm.generate = counted

    def evaluate(bundle: str) -> dict[str, float]:
        tokens.append(0)
        return evaluate_core(llm, bundle)["results"]
    result = timed_core(evaluate, workload)
    return dict(result, tokens=tokens[-1], dtype=str(llm.engine.dtype).removeprefix("torch."),
                torch_threads=torch.get_num_threads())


def core_nanochat(model_dir: str, workload: dict, dtype: str) -> dict:
    """nanochat's own evaluate_task on each task, as its base_eval runs CORE (its dtype is
    its own: float32 on a CPU)."""
    import torch
    from microvllm.core_eval import read_bundle
    from .nanochat_reference import nanochat_engine
    engine = nanochat_engine(workload["nanochat_src"], model_dir)
    from nanochat.common import COMPUTE_DTYPE
    from nanochat.core_eval import evaluate_task

    def evaluate(bundle: str) -> dict[str, float]:
        return {task.label: evaluate_task(engine.model, engine.tokenizer, task.data, "cpu",
                                          {"task_type": task.task_type, "num_fewshot": task.num_fewshot,
                                           "continuation_delimiter": task.continuation_delimiter})
                for task in read_bundle(bundle)}
    return dict(timed_core(evaluate, workload), dtype=str(COMPUTE_DTYPE).removeprefix("torch."),
                torch_threads=torch.get_num_threads())


def timed_core(evaluate, workload: dict) -> dict:
    """The warm-up bundle, then the timed one: each task's accuracy, the wall time, busy threads."""
    from .local_server import busy_threads, thread_cpu_seconds
    evaluate(workload["warmup_bundle"])
    before, start = thread_cpu_seconds(os.getpid()), time.perf_counter()
    results = evaluate(workload["bundle"])
    wall = time.perf_counter() - start
    return dict(wall=wall, results=results, threads=busy_threads(before, thread_cpu_seconds(os.getpid()), wall))


def run_core(root: Path, args) -> dict[str, list[dict]]:
    """(c): one era-E checkpoint of the shape (nanochat HEAD loads no era-A one) through
    microvllm's evaluate_core and nanochat's evaluate_task, on a random bundle."""
    from .core_bundle import write_bundle
    from .vs_nanochat import MODEL, write_checkpoint
    from .vs_vllm import MODELS, in_subprocess
    shape = MODELS[args.shape]
    checkpoint = write_checkpoint(root / args.shape / "nanochat-era-e",
                                  {**MODEL, **shape, "n_kv_head": shape["n_head"]})
    examples = QUICK_CORE_EXAMPLES if args.quick else CORE_EXAMPLES
    workload = {"bundle": str(write_bundle(root / f"bundle-{examples}", examples, seed=0)),
                "warmup_bundle": str(write_bundle(root / f"bundle-{examples}-warmup", examples, seed=1)),
                "nanochat_src": str(Path(args.nanochat_src).expanduser().resolve())}
    workload_file = root / f"core-{examples}.json"
    workload_file.write_text(json.dumps(workload))
    runs = {"microvllm": [], "nanochat": []}
    for r in range(args.rounds):
        for engine in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            worker = "core-ours" if engine == "microvllm" else "core-nanochat"
            runs[engine].append(in_subprocess(sys.executable, worker, checkpoint, workload_file, args.dtype,
                                              module="benchmarks.scoring"))
            print(f"  CORE    | {engine:9} round {r}: {runs[engine][-1]['wall']:8.2f} s", flush=True)
    tokens = runs["microvllm"][0]["tokens"]  # the same prompts on both sides
    for run in runs["microvllm"] + runs["nanochat"]:
        run["tok_s"] = tokens / run["wall"]
    return runs


def report_core(runs: dict[str, list[dict]], args) -> bool:
    """Print (c)'s row; whether both engines give every task the same accuracy."""
    examples = QUICK_CORE_EXAMPLES if args.quick else CORE_EXAMPLES
    median = {e: statistics.median(r["tok_s"] for r in runs[e]) for e in runs}
    print("\n| workload | microvllm | nanochat | microvllm / nanochat |\n|---|---|---|---|")
    print(f"| (c) CORE, evaluate_core against nanochat's evaluate_task ({len(runs['microvllm'][0]['results'])} "
          f"tasks x {examples} examples, {runs['microvllm'][0]['tokens']:,} prompt tokens) | {cell(runs['microvllm'])} "
          f"| {cell(runs['nanochat'])} | {median['microvllm'] / median['nanochat']:.2f}x |")
    ours, theirs = runs["microvllm"][0]["results"], runs["nanochat"][0]["results"]
    agree = all(o["results"] == t["results"] for o in runs["microvllm"] for t in runs["nanochat"])
    print(f"\nCORE accuracies equal nanochat's on every task: {'yes' if agree else 'NO'} ("
          + ", ".join(f"{label} {ours[label]:.4f}/{theirs[label]:.4f}" for label in ours) + ")")
    return agree


# -- the report ---------------------------------------------------------------------------

def max_difference(ours: list[list[float]], theirs: list[list[float]]) -> float:
    return max(abs(a - b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True))


def cell(results: list[dict]) -> str:
    tok_s = statistics.median(r["tok_s"] for r in results)
    threads = results[0]["threads"]
    told = f", torch {results[0]['torch_threads']}" if "torch_threads" in results[0] else ""
    return f"{tok_s:,.0f} ({results[0]['dtype']}, {threads} thread{'s' * (threads != 1)} busy{told})"


def report(served: dict[str, list[dict]], offline: dict[str, list[dict]], args) -> bool:
    """Print the table and the log-prob checks; whether microvllm's served log-probs equal its offline
    ones for the same batches (float32 sums, and so the last bits, change with a batch's makeup)."""
    from .vs_nanochat import cpu_name
    engines = list(served)
    print(f"\n{cpu_name()}; OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"prompt tokens scored a second, median of {args.rounds} round{'s' * (args.rounds != 1)}")
    header = "| workload | " + " | ".join(engines) + (" | microvllm / vLLM |" if len(engines) > 1 else " |")
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    labels = (f"(a) served, lm-eval local-completions ({args.batch_size} prompts a request, "
              f"{args.concurrency} in flight)", "(b) offline, LLM.generate with prompt_logprobs=1")
    for label, results in zip(labels, (served, offline)):
        cells = [cell(results[e]) for e in engines]
        if len(engines) > 1:
            median = {e: statistics.median(r["tok_s"] for r in results[e]) for e in engines}
            cells.append(f"{median['microvllm'] / median['vLLM']:.2f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")
    ours_served, ours_offline = served["microvllm"][0], offline["microvllm"][0]
    exact = all(s["check"] == o["check"] for s in served["microvllm"] for o in offline["microvllm"])
    difference = max(max_difference(s["check"], o["check"]) for s in served["microvllm"] for o in offline["microvllm"])
    agree = difference <= ROUNDING
    print(f"\nmicrovllm's served log-probs equal its offline ones, the same batches in the same order "
          f"(the warm-up): {'yes, exactly' if exact else 'yes, to float32 rounding' if agree else 'NO'} "
          f"(largest difference {difference:.3g})")
    print(f"microvllm served under load against offline all at once, batches of another makeup: largest "
          f"difference {max_difference(ours_served['logprobs'], ours_offline['logprobs']):.3g}")
    if "vLLM" in engines:
        for how, results in (("served", served), ("offline", offline)):
            difference = max_difference(results["microvllm"][0]["logprobs"], results["vLLM"][0]["logprobs"])
            print(f"largest |microvllm - vLLM| log-prob, {how}: {difference:.3g}")
    return agree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu installed")
    parser.add_argument("--shape", choices=("6x384", "d20"), default="6x384", help="the random model")
    parser.add_argument("--dtype", default="float32",
                        help="microvllm's and vLLM's dtype (nanochat's is its own: float32 on a CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts a served request (lm-eval's batch_size)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="served requests in flight (lm-eval's num_concurrent)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each engine, the order alternating")
    parser.add_argument("--quick", action="store_true",
                        help="4 contexts (16 prompts) and 8 CORE examples a task: a smoke run")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary dir)")
    parser.add_argument("--nanochat-src", help="a nanochat checkout: adds CORE, microvllm against nanochat")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workload-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an int >= 1, got {getattr(args, name)}")
    if args.nanochat_src and not (Path(args.nanochat_src).expanduser() / "nanochat" / "core_eval.py").is_file():
        parser.error(f"--nanochat-src {args.nanochat_src} is not a nanochat checkout: it has no nanochat/core_eval.py")

    if args.worker:
        run = WORKERS[args.worker]
        print(json.dumps(run(args.model_dir, json.loads(Path(args.workload_file).read_text()), args.dtype)))
        return

    root = Path(args.dir or tempfile.mkdtemp(prefix="scoring_"))
    served, offline = run_scoring(root, args)
    core = run_core(root, args) if args.nanochat_src else None
    agree = report(served, offline, args)
    if core is not None:
        agree = report_core(core, args) and agree
    if not agree:
        raise SystemExit(1)


WORKERS = {"ours": offline_ours, "vllm": offline_vllm, "core-ours": core_ours, "core-nanochat": core_nanochat}

if __name__ == "__main__":
    main()
