"""Generate text with microvllm from the command line.

With no arguments, run.py loads the small Shakespeare model bundled in
models/shakespeare-d4 and continues a few speaker openings:

    python run.py
    python run.py --prompt "OTHELLO.\\n" --n 3 --max-tokens 60
    python run.py --prompts-file prompts.txt --temperature 0

Each prompt is printed with its completion(s), then one summary line.
In --prompt and in prompt files (one prompt per line), a literal \\n stands
for a line break.
"""

import argparse
import sys
import time
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "shakespeare-d4"
# Speeches in the training text open with the speaker's name on a line of its own.
DEFAULT_PROMPTS = ["ROMEO.\n", "JULIET.\n", "KING RICHARD.\n", "FALSTAFF.\nNow, Hal,"]

EPILOG = """\
real nanochat checkpoints:
  Train one with karpathy/nanochat (https://github.com/karpathy/nanochat): it writes
  checkpoints to ~/.cache/nanochat/base_checkpoints/d20 (chatsft_checkpoints/d20 after
  chat fine-tuning) and the tokenizer to ~/.cache/nanochat/tokenizer. Or download a
  published nanochat checkpoint dir (model_<step>.pt + meta_<step>.json, with its
  tokenizer.pkl). Then point --model at the dir:

    python run.py --model ~/.cache/nanochat/base_checkpoints/d20 --prompt "The capital of France is"
    python run.py --model ~/.cache/nanochat/chatsft_checkpoints/d20 --chat --prompt "Why is the sky blue?"

  Or name them as nanochat does, by phase (base, mid, sft, rl) and model tag, under
  $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); a Hugging Face hub id also works
  (from the local cache, downloaded unless HF_HUB_OFFLINE=1; needs pip install -e ".[hf]"):

    python run.py --model sft:d20 --chat --prompt "Why is the sky blue?"
    python run.py --model karpathy/nanochat-d32 --chat --prompt "Hi"

  The largest step in the dir is used unless --step is given. The tokenizer
  (tokenizer.pkl, or tokenizer.json) is looked for in DIR, DIR/tokenizer,
  DIR/../tokenizer, $NANOCHAT_BASE_DIR/tokenizer and ~/.cache/nanochat/tokenizer, in
  that order; --tokenizer DIR overrides the search.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_MODEL),
                        help="a checkpoint dir (nanochat or transformers format), a nanochat SOURCE[:TAG] "
                             "such as sft:d20, or a hub id ORG/NAME (default: the bundled demo model)")
    parser.add_argument("--tokenizer", help="dir holding tokenizer.pkl (default: searched, see below)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the largest)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    prompts.add_argument("--prompts-file", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message in nanochat's chat format "
                             "(for chat fine-tuned checkpoints; a warning says when the "
                             "checkpoint is known to be a base model)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="-1 = no limit (default 50)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    parser.add_argument("--max-tokens", type=int, default=100, help="per completion (default 100)")
    parser.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed of the first prompt, +1 for each next one (default 0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    # LLM's names, vLLM's "half" and "float" among them (listed here: --help loads no torch)
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "half", "float"],
                        help="auto: bfloat16 on cuda and on CPUs with bfloat16 instructions "
                             "(AVX-512 BF16 or AMX), float32 on other CPUs; float16 (half) runs "
                             "as bfloat16 on a CPU, as in vLLM (default: auto)")
    parser.add_argument("--speculative-config", metavar="JSON",
                        help="speculative decoding, as JSON: '{\"method\": \"ngram\", "
                             "\"num_speculative_tokens\": 4}' or '{\"model\": DRAFT_DIR, "
                             "\"num_speculative_tokens\": 4}'; the same outputs (default: none)")
    parser.add_argument("--cpu-threads", type=int,
                        help="torch threads on cpu (default: $OMP_NUM_THREADS if set, else the "
                             "cores this process may use less those other processes keep busy, "
                             "at least one)")
    return parser


def base_model_reason(model_dir: str) -> str | None:
    """Why the checkpoint is known to be a base (not chat fine-tuned) model, if it is.

    Weights do not say whether a model learned the chat format; where it was saved does:
    nanochat writes base training to base_checkpoints/ (and mid-training, SFT and RL to
    mid_, chatsft_ and chatrl_checkpoints/), and the bundled model is a base model.
    """
    path = Path(model_dir).expanduser().resolve()
    if path == BUNDLED_MODEL:
        return "the bundled demo model is a base model trained on plain Shakespeare text"
    if "base_checkpoints" in path.parts:
        return f"{model_dir} is under nanochat's base_checkpoints/, a model before chat fine-tuning"
    return None


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--prompts-file: cannot read {args.prompts_file}: {e}")
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            parser.error(f"--prompts-file: {args.prompts_file} holds no prompt")
    else:
        prompts = args.prompt or DEFAULT_PROMPTS
    return [p.replace("\\n", "\n") for p in prompts]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    if args.cpu_threads is not None and args.cpu_threads < 1:
        parser.error("--cpu-threads must be >= 1")
    if args.chat and (reason := base_model_reason(args.model)):
        print(f"run.py: warning: --chat on a base model: {reason}. It has not learned nanochat's "
              "chat format, so expect it to continue the text rather than reply; use a chat "
              "fine-tuned checkpoint (e.g. chatsft_checkpoints/d20) for replies.", file=sys.stderr)

    # imported here so that --help and flag errors answer without loading torch
    from microvllm import LLM, SamplingParams
    from microvllm.engine.config import EngineConfig
    from microvllm.validation import json_object_argument

    try:
        # one seed per prompt (seed, seed+1, ...): reproducible, yet prompts don't share draws
        params = [SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed + i)
                  for i in range(len(prompts))]
    except (ValueError, TypeError) as e:
        parser.error(f"bad sampling value: {e}")
    try:
        speculative_config = (None if args.speculative_config is None
                              else json_object_argument(args.speculative_config))
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --speculative-config: {e}")
    try:
        # every sequence runs at once, and the KV cache holds just those (on cpu, its
        # default is room for max_num_seqs full-length sequences)
        llm = LLM(model=args.model, tokenizer=args.tokenizer, step=args.step,
                  device=args.device, dtype=args.dtype, cpu_threads=args.cpu_threads,
                  speculative_config=speculative_config,
                  max_num_seqs=min(len(prompts) * args.n, EngineConfig.max_num_seqs))
    # TypeError too: a checkpoint's meta may hold a value of the wrong type. Caught here
    # only, where input is checked, so that a TypeError from a bug keeps its traceback.
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        parser.error(str(e))
    try:
        start = time.perf_counter()
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                               use_tqdm=False)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.error(str(e))

    for i, (prompt, output) in enumerate(zip(prompts, outputs), 1):
        print(f"=== prompt {i}/{len(prompts)}: {prompt!r}")
        for completion in output.outputs:
            if len(output.outputs) > 1:
                print(f"--- completion {completion.index + 1}/{len(output.outputs)}")
            print(completion.text if args.chat else prompt + completion.text)
        print()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(f"requests {len(outputs)} | prompt tokens {prompt_tokens} | generated tokens {generated} | "
          f"{seconds:.2f} s | {generated / seconds:.1f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
