"""microvllm's nanochat Engine against nanochat's own, on the CPU, on nanochat's workloads.

Writes one random-weight era-E (nanochat HEAD) checkpoint, 6 layers x 384, and runs two
workloads shaped like nanochat's scripts:
- chat_rl: 8 prompts x 16 samples, temperature 1, top_k 50, prompts of 64..256 tokens,
  up to 128 new tokens;
- chat_eval: 32 prompts, greedy, one sample each, up to 128 new tokens.
nanochat's Engine runs one generate_batch call per prompt, as its scripts do;
microvllm's adapter one generate_many call for all of them. Each engine first runs a
warm-up of the same shape with other prompts. Prints generated tokens/s of both and the
ratio, and checks that the greedy (eval) rows are identical: microvllm runs at its
defaults (bfloat16 on a CPU with bfloat16 instructions), so the check reruns the eval
workload in float32, nanochat's CPU dtype, where the rows must match token for token.

    OMP_NUM_THREADS=1 python -m benchmarks.vs_nanochat --nanochat-src ~/nanochat

Both engines run in this process on the threads OMP_NUM_THREADS allows. nanochat's
dependencies must import here.
"""

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MODEL = dict(sequence_len=1024, vocab_size=4096, n_layer=6, n_head=6, n_kv_head=6, n_embd=384,
             window_pattern="SSSL")
# name: (prompts, samples, prompt lengths, max new tokens, temperature, top_k)
WORKLOADS = {
    "chat_rl": (8, 16, (64, 256), 128, 1.0, 50),
    "chat_eval": (32, 1, (64, 256), 128, 0.0, None),
}
QUICK = {"chat_rl": (2, 16, (64, 256), 64, 1.0, 50), "chat_eval": (8, 1, (64, 256), 64, 0.0, None)}

Rows = list[list[int]]
Batches = list[tuple[Rows, Rows]]


def write_checkpoint(directory: Path, model: dict = MODEL) -> Path:
    """A random era-E (nanochat HEAD) checkpoint of `model`'s config, unless one is there."""
    from microvllm.model.config import ModelConfig
    from .random_checkpoint import random_state_dict, save_checkpoint, tokenizer_with_vocab
    if not (directory / "meta_000000.json").exists():
        state = random_state_dict(ModelConfig(**model, era="E"), seed=0)
        save_checkpoint(directory, 0, model, state, tokenizer_with_vocab(model["vocab_size"]))
    return directory


def make_prompts(count: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """Chat-shaped token prompts: <|bos|>, random text tokens, <|assistant_start|>."""
    rng = random.Random(seed)
    bos, assistant_start = MODEL["vocab_size"] - 9, MODEL["vocab_size"] - 6
    return [[bos] + [rng.randrange(MODEL["vocab_size"] - 9) for _ in range(rng.randint(*lengths) - 2)]
            + [assistant_start] for _ in range(count)]


def per_prompt(engine) -> Callable[..., Batches]:
    """nanochat's scripts: one generate_batch call per prompt."""
    return lambda prompts, **kwargs: [engine.generate_batch(p, **kwargs) for p in prompts]


def timed(generate: Callable[..., Batches], workload: tuple, warmup_prompts, prompts) -> tuple[float, Batches]:
    _, samples, _, max_tokens, temperature, top_k = workload
    kwargs = dict(num_samples=samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k)
    generate(warmup_prompts, **kwargs)
    start = time.perf_counter()
    batches = generate(prompts, **kwargs)
    wall = time.perf_counter() - start
    generated = sum(len(row) - len(p) for p, (rows, _) in zip(prompts, batches) for row in rows)
    return generated / wall, batches


def cpu_name() -> str:
    from .vs_vllm import cpu_features
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    return f"{name}, {os.cpu_count()} CPUs ({cpu_features()})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanochat-src", required=True, help="a nanochat checkout (its dependencies installed)")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary dir)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller workloads: chat_rl 2 prompts x 16, chat_eval 8 prompts, 64 new tokens")
    args = parser.parse_args(argv)

    from microvllm.nanochat import Engine
    from .nanochat_reference import nanochat_engine
    checkpoint = write_checkpoint(Path(args.dir or tempfile.mkdtemp(prefix="vs_nanochat_")))
    theirs = nanochat_engine(args.nanochat_src, checkpoint)
    ours = Engine(checkpoint)
    workloads = QUICK if args.quick else WORKLOADS
    rows = []
    for index, (name, workload) in enumerate(workloads.items()):
        prompts = make_prompts(workload[0], workload[2], seed=2 * index)
        warmup = make_prompts(workload[0], workload[2], seed=2 * index + 1)
        nanochat_tok_s, want = timed(per_prompt(theirs), workload, warmup, prompts)
        ours_tok_s, got = timed(ours.generate_many, workload, warmup, prompts)
        print(f"{name}: nanochat {nanochat_tok_s:,.0f} tok/s, microvllm {ours_tok_s:,.0f} tok/s "
              f"({ours.llm.engine.dtype})", flush=True)
        rows.append((name, nanochat_tok_s, ours_tok_s, str(ours.llm.engine.dtype).removeprefix("torch.")))
        if workload[4] == 0.0:
            same = sum(a == b for a, b in zip(got, want))
            print(f"  greedy rows identical at microvllm's default dtype: {same}/{len(prompts)}")
            float32 = Engine(checkpoint, dtype="float32")
            float32_tok_s, got32 = timed(float32.generate_many, workload, warmup, prompts)
            same32 = sum(a == b for a, b in zip(got32, want))
            print(f"  float32: {float32_tok_s:,.0f} tok/s, greedy rows identical to nanochat's: "
                  f"{same32}/{len(prompts)}")
            rows.append((f"{name} (float32)", nanochat_tok_s, float32_tok_s, "float32"))
            if same32 != len(prompts):
                raise SystemExit("float32 greedy rows differ from nanochat's")

    print(f"\n{cpu_name()}, {os.environ.get('OMP_NUM_THREADS', 'default')} threads (OMP_NUM_THREADS); "
          "generated tokens/s; nanochat in float32")
    print("| workload | nanochat Engine | microvllm | ratio |\n|---|---|---|---|")
    for name, nanochat_tok_s, ours_tok_s, dtype in rows:
        print(f"| {name} | {nanochat_tok_s:,.0f} | {ours_tok_s:,.0f} ({dtype}) | {ours_tok_s / nanochat_tok_s:.1f}x |")


if __name__ == "__main__":
    main()
