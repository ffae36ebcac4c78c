"""The CORE eval bundle: tasks, their examples and random baselines, read as nanochat's
`scripts/base_eval.py` reads them.

A bundle dir holds `core.yaml` (its `icl_tasks` list: label, icl_task_type, dataset_uri,
num_fewshot, continuation_delimiter), `eval_data/<dataset_uri>` (one JSON example a line)
and `eval_meta_data.csv` (a `Random baseline` percentage per `Eval Task`). Each task's
examples are shuffled with a fixed seed before `max_per_task` cuts them, so a cut run
evaluates the same examples every time, and the ones nanochat evaluates.
"""

import csv
import json
import random
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ..validation import check_int

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337
LAYOUT = "a CORE bundle dir holds core.yaml, eval_data/ and eval_meta_data.csv (nanochat's eval_bundle layout)"


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str                  # one of TASK_TYPES
    num_fewshot: int
    continuation_delimiter: str
    data: list[dict]                # the examples, shuffled and cut
    random_baseline: float          # percent: the accuracy of guessing


def read_bundle(bundle_dir: str | PathLike, max_per_task: int = -1) -> list[Task]:
    """The bundle's tasks in core.yaml's order, each with at most `max_per_task`
    examples (-1 = all)."""
    if check_int("max_per_task", max_per_task, -1) == 0:
        raise ValueError("max_per_task must be -1 (every example) or an int >= 1, got 0")
    bundle = Path(bundle_dir).expanduser()
    config_path, meta_path = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    for path in (config_path, bundle / "eval_data", meta_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {LAYOUT}")
    try:
        import yaml
    except ImportError:
        raise ImportError("reading core.yaml needs PyYAML: pip install pyyaml") from None
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list) or not config["icl_tasks"]:
        raise ValueError(f"{config_path} has no icl_tasks list: {LAYOUT}")
    with open(meta_path, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    return [read_task(entry, bundle / "eval_data", baselines, max_per_task) for entry in config["icl_tasks"]]


def read_task(entry: dict, data_dir: Path, baselines: dict[str, float], max_per_task: int) -> Task:
    label = entry.get("label")
    for key in ("label", "icl_task_type", "dataset_uri", "num_fewshot"):
        if key not in entry:
            raise ValueError(f"core.yaml task {label or entry!r} has no {key!r}")
    if entry["icl_task_type"] not in TASK_TYPES:
        raise ValueError(f"core.yaml task {label!r}: icl_task_type {entry['icl_task_type']!r} "
                         f"is not one of {TASK_TYPES}")
    if label not in baselines:
        raise ValueError(f"eval_meta_data.csv has no row for task {label!r} (its 'Eval Task' column)")
    path = data_dir / entry["dataset_uri"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: task {label!r} names it as its dataset_uri")
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    if not data:
        raise ValueError(f"{path} holds no examples")
    # nanochat's core.yaml lists shot counts; the first is the one evaluated
    num_fewshot = entry["num_fewshot"][0] if isinstance(entry["num_fewshot"], list) else entry["num_fewshot"]
    check_int(f"task {label!r} num_fewshot", num_fewshot, 0, len(data) - 1)
    return Task(label, entry["icl_task_type"], num_fewshot, entry.get("continuation_delimiter", " "),
                data, baselines[label])
