"""CORE prompts: an example rendered as nanochat's `core_eval.py` renders it, tokenized
with `<|bos|>` in front, and the span of tokens whose log-probs decide it.

Each few-shot example is a shot: its context, the task's continuation delimiter, its
gold continuation, then a blank line; the example itself follows the shots. Per task type:
- multiple_choice: one prompt per choice (query, delimiter, choice); the prompts share
  their context, so the continuation is what follows their common token prefix;
- schema: one prompt per context option (option, delimiter, continuation); the
  continuation is their common token suffix;
- language_modeling: one prompt (context stripped of surrounding whitespace, delimiter,
  continuation); the continuation is what follows the tokens of the prompt without it,
  which (stripped too) must be a token prefix of the whole.
The shots are drawn per example from the task's other examples, with a seed of the
example's index, so every run and nanochat see the same shots.
"""

import random
from dataclasses import dataclass

from ..tokenizer import Tokenizer
from .bundle import Task

FEWSHOT_SEED = 1234   # plus the example's index


@dataclass(frozen=True)
class Scored:
    """One prompt to score: its tokens from `start` to the end are the continuation."""
    token_ids: list[int]
    start: int


def scored_prompts(task: Task, index: int, tokenizer: Tokenizer, max_len: int) -> list[Scored]:
    """The prompts that decide example `index` of `task`, each cut to its last `max_len`
    tokens where longer (nanochat's crop for a model with a maximum length)."""
    where = f"task {task.label!r} example {index}"
    token_ids = [tokenizer.encode(text) for text in rendered(task, index)]
    if task.task_type == "multiple_choice":
        start = common_prefix_length(token_ids)
        spans = [(t, start) for t in token_ids]
    elif task.task_type == "schema":
        shared = common_prefix_length([t[::-1] for t in token_ids])
        spans = [(t, len(t) - shared) for t in token_ids]
    else:
        without, whole = token_ids
        if len(without) >= len(whole) or whole[:len(without)] != without:
            raise ValueError(f"{where}: its context's tokens are not a prefix of the tokens of context "
                             "and continuation (or the continuation is empty)")
        spans = [(whole, len(without))]
    return [cropped(t, start, max_len, where) for t, start in spans]


def rendered(task: Task, index: int) -> list[str]:
    item, delimiter = task.data[index], task.continuation_delimiter
    examples = fewshot_examples(task, index)
    if task.task_type == "multiple_choice":
        head = shots([(ex["query"], ex["choices"][ex["gold"]]) for ex in examples], delimiter)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        head = shots([(ex["context_options"][ex["gold"]], ex["continuation"]) for ex in examples], delimiter)
        return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    head = shots([(str(ex["context"]).strip(), ex["continuation"]) for ex in examples], delimiter)
    without = f"{head}{str(item['context']).strip()}{delimiter}"
    # stripped, so that trailing whitespace is not a token the continuation would absorb
    return [without.strip(), f"{without}{item['continuation']}"]


def fewshot_examples(task: Task, index: int) -> list[dict]:
    if task.num_fewshot == 0:
        return []
    # sample() draws positions in the list of the other examples from its length alone:
    # position j of that list is example j, or j + 1 from `index` on
    picks = random.Random(FEWSHOT_SEED + index).sample(range(len(task.data) - 1), task.num_fewshot)
    return [task.data[j + (j >= index)] for j in picks]


def shots(pairs: list[tuple], delimiter: str) -> str:
    return "".join(f"{context}{delimiter}{continuation}\n\n" for context, continuation in pairs)


def common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    return next((i for i in range(shortest) if any(s[i] != first[i] for s in sequences)), shortest)


def cropped(token_ids: list[int], start: int, max_len: int, where: str) -> Scored:
    excess = len(token_ids) - max_len
    if excess <= 0:
        return Scored(token_ids, start)
    if start - excess < 1:
        raise ValueError(f"{where}: its continuation ({len(token_ids) - start} tokens) and a token "
                         f"before it do not fit in the {max_len} tokens a prompt may have")
    return Scored(token_ids[excess:], start - excess)
