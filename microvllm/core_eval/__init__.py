"""nanochat's CORE metric (the DCLM paper's in-context-learning suite), offline on an LLM.

    from microvllm import LLM
    from microvllm.core_eval import evaluate_core
    out = evaluate_core(LLM("base:d20"), "~/.cache/nanochat/eval_bundle", max_per_task=500)
    out["core_metric"], out["results"], out["centered_results"]

Verdicts equal those of nanochat's `core_eval.evaluate_task` on the same checkpoint in
float32; all tasks' prompts run as one batch. From the command line:

    python -m microvllm.core_eval --model DIR --bundle DIR [--max-per-task N] [--dtype float32]
"""

from .bundle import Task, read_bundle
from .evaluate import core_results, evaluate_core, evaluate_tasks

__all__ = ["evaluate_core", "evaluate_tasks", "core_results", "read_bundle", "Task"]
