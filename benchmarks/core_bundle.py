"""A CORE eval bundle of random text, laid out as nanochat's eval_bundle, for timing CORE.

nanochat's bundle is a download; this one is written here, with one task of each kind
CORE holds, shaped like the real ones: a zero-shot 4-way multiple choice with long
endings (as HellaSwag), a few-shot 4-way multiple choice with short answers (as ARC), a
two-context schema task (as Winograd) and a one-word language-modelling task (as
LAMBADA). The words are random, so a random model scores about the random baseline.
"""

import csv
import json
import random
from pathlib import Path

import yaml

# label: (icl_task_type, num_fewshot, continuation_delimiter, random baseline %)
TASKS = {
    "endings_4way": ("multiple_choice", 0, " ", 25.0),
    "answers_4way_3shot": ("multiple_choice", 3, "\nAnswer: ", 25.0),
    "schema_2way": ("schema", 0, " ", 50.0),
    "last_word": ("language_modeling", 0, " ", 0.0),
}


def words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 6))) for _ in range(count))


def example(task_type: str, label: str, rng: random.Random) -> dict:
    """One example in the fields nanochat's core_eval reads for its task type."""
    if task_type == "multiple_choice":
        query_words, choice_words = (30, 8) if label == "endings_4way" else (12, 2)
        return {"query": words(rng, query_words), "choices": [words(rng, choice_words) for _ in range(4)],
                "gold": rng.randrange(4)}
    if task_type == "schema":
        return {"context_options": [words(rng, 15) for _ in range(2)], "continuation": words(rng, 6),
                "gold": rng.randrange(2)}
    return {"context": words(rng, 40), "continuation": words(rng, 1)}


def write_bundle(directory: Path, examples_per_task: int, seed: int = 0) -> Path:
    """core.yaml, eval_data/<label>.jsonl and eval_meta_data.csv in `directory` (written once)."""
    if (directory / "eval_meta_data.csv").exists():  # written last
        return directory
    rng = random.Random(seed)
    (directory / "eval_data").mkdir(parents=True, exist_ok=True)
    entries = []
    for label, (task_type, shots, delimiter, _) in TASKS.items():
        lines = [json.dumps(example(task_type, label, rng)) for _ in range(examples_per_task)]
        (directory / "eval_data" / f"{label}.jsonl").write_text("\n".join(lines) + "\n")
        entries.append({"label": label, "dataset_uri": f"{label}.jsonl", "num_fewshot": [shots],
                        "icl_task_type": task_type, "continuation_delimiter": delimiter})
    (directory / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    with open(directory / "eval_meta_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Random baseline"])
        writer.writerows((label, baseline) for label, (*_, baseline) in TASKS.items())
    return directory
