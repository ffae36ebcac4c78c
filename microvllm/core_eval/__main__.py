"""python -m microvllm.core_eval: CORE of a checkpoint on an eval bundle, with a progress
bar, then the per-task table (accuracy, centered accuracy) and the CORE metric."""

import argparse

from ..llm import LLM
from .bundle import read_bundle
from .evaluate import core_results, evaluate_tasks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m microvllm.core_eval", description=__doc__)
    parser.add_argument("--model", required=True, help="a checkpoint dir, a nanochat SOURCE[:TAG] or a hub id")
    parser.add_argument("--bundle", required=True,
                        help="the eval bundle dir: core.yaml, eval_data/, eval_meta_data.csv")
    parser.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1 = all)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer dir, if not found beside the model")
    args = parser.parse_args(argv)
    try:  # before the model loads: a bad bundle fails fast
        tasks = read_bundle(args.bundle, args.max_per_task)
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.error(str(e))
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    out = core_results(tasks, evaluate_tasks(llm, tasks, use_tqdm=True))
    print(f"{'Task':<35} {'Accuracy':>10} {'Centered':>10}")
    for label, result in out["results"].items():
        print(f"{label:<35} {result:>10.6f} {out['centered_results'][label]:>10.6f}")
    print(f"{'CORE':<35} {'':>10} {out['core_metric']:>10.6f}")
    return out


if __name__ == "__main__":
    main()
