"""CORE on an LLM: every prompt of every task scored in one `LLM.generate` call, then
the verdicts, accuracies and the CORE metric as nanochat's `core_eval.py` and
`scripts/base_eval.py` compute them.

A prompt is scored through its prompt log-probs (`SamplingParams(prompt_logprobs=0)`):
entry i holds token i's log-prob given the tokens before it, and its rank. Only the
continuation's entries are asked for (`prompt_logprobs_start`), so the context costs no
logits, and the choices of an example, which share their context, compute it once
through the prefix cache.
- multiple_choice and schema: the prediction is the prompt whose continuation has the
  lowest mean loss (minus log-prob); correct when it is the gold one;
- language_modeling: correct when every continuation token is the most likely one
  given the tokens before it (rank 1: nanochat's argmax).
Each task's accuracy is centered on its random baseline, so that guessing scores 0 and
a perfect model 1; CORE is the mean of the centered accuracies.
"""

import math
from collections.abc import Callable
from functools import lru_cache
from os import PathLike

import torch
from tqdm.auto import tqdm

from ..llm import LLM
from ..outputs import Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .bundle import Task, read_bundle
from .prompts import Scored, scored_prompts


def evaluate_core(llm: LLM, bundle_dir: str | PathLike, max_per_task: int = -1,
                  use_tqdm: bool | Callable = True) -> dict:
    """CORE of `llm`'s model on the bundle in `bundle_dir` (see bundle.py), with at most
    `max_per_task` examples of each task (-1 = all), as base_eval's evaluate_core returns
    it: {"results": {label: accuracy}, "centered_results": {label: centered accuracy},
    "core_metric": the mean of the centered accuracies}."""
    tasks = read_bundle(bundle_dir, max_per_task)
    return core_results(tasks, evaluate_tasks(llm, tasks, use_tqdm))


def core_results(tasks: list[Task], verdicts: list[list[bool]]) -> dict:
    """base_eval's dict from each task's verdicts."""
    results = {task.label: accuracy(v) for task, v in zip(tasks, verdicts)}
    centered = {task.label: centered_accuracy(results[task.label], task.random_baseline) for task in tasks}
    return {"results": results, "centered_results": centered,
            "core_metric": sum(centered.values()) / len(centered)}


def evaluate_tasks(llm: LLM, tasks: list[Task], use_tqdm: bool | Callable = False) -> list[list[bool]]:
    """Per task, per example: whether the model gets it right."""
    # the longest prompt the engine takes, leaving room for the one token it generates
    max_len = llm.engine.max_model_len - 1
    scored = [[scored_prompts(task, index, llm.tokenizer, max_len) for index in range(len(task.data))]
              for task in tasks]
    prompts = [p for per_task in scored for per_example in per_task for p in per_example]
    outputs = iter(llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts],
                                [scoring_params(p.start) for p in prompts],
                                use_tqdm=progress_bar if use_tqdm is True else use_tqdm))
    return [[is_correct(task, item, example, [next(outputs) for _ in example])
             for item, example in zip(task.data, per_task)] for task, per_task in zip(tasks, scored)]


@lru_cache(maxsize=None)
def scoring_params(start: int) -> SamplingParams:
    """One prompt's scoring: the log-probs (rank included) of its tokens from `start` on,
    the continuation (no logits are computed for the context, which the prefix cache may
    share), and one greedy token that nobody reads (the engine generates at least one)."""
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=start,
                          detokenize=False, tools=None)


def is_correct(task: Task, item: dict, scored: list[Scored], outputs: list[RequestOutput]) -> bool:
    if task.task_type == "language_modeling":
        (prompt,), (output,) = scored, outputs
        return all(entry.rank == 1 for entry in continuation_logprobs(prompt, output))
    losses = [mean_loss(continuation_logprobs(p, out)) for p, out in zip(scored, outputs)]
    # Python's min and index, as nanochat's: a NaN (empty span) compares the same way
    return losses.index(min(losses)) == item["gold"]


def continuation_logprobs(prompt: Scored, output: RequestOutput) -> list[Logprob]:
    """The log-probs of the continuation's tokens. A span starting at position 0 is
    empty: nothing predicts the first token (nanochat's span is empty there too)."""
    if prompt.start == 0:
        return []
    return [entry[token] for token, entry in zip(prompt.token_ids[prompt.start:],
                                                  output.prompt_logprobs[prompt.start:])]


def mean_loss(logprobs: list[Logprob]) -> float:
    return -sum(lp.logprob for lp in logprobs) / len(logprobs) if logprobs else math.nan


def accuracy(verdicts: list[bool]) -> float:
    # in float32, as nanochat averages its tensor of verdicts
    return torch.tensor(verdicts, dtype=torch.float32).mean().item()


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 for guessing (random_baseline, a percentage), 1 for every example right."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def progress_bar(**kwargs) -> tqdm:
    return tqdm(**{**kwargs, "desc": "CORE prompts"})
