"""Workloads: the prompts a benchmark sends, from Alpaca or made up.

Alpaca records come from the Hugging Face hub (`tatsu-lab/alpaca`, through the
optional `datasets` package) or from a local JSON list, JSONL or parquet file with
the same fields: `instruction`, optional `input` and `output`. Synthetic prompts are
seeded random token ids of chosen lengths, for runs that need exact control of the
prompt and output lengths.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

HF_ALPACA = "tatsu-lab/alpaca"
ALTERNATIVES = ("use --dataset-path FILE (a local Alpaca-style .json, .jsonl or .parquet) "
                "or --synthetic")
RECORD_FIELDS = "a non-empty string 'instruction', and optional string 'input' and 'output'"


class DatasetUnavailableError(RuntimeError):
    """The hub dataset could not be loaded here (no `datasets` package, or no network)."""


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]   # starts with <|bos|>
    max_tokens: int


# -- Alpaca records ---------------------------------------------------------------------

def load_hf_alpaca(num_records: int, name: str = HF_ALPACA) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(
            f"loading {name} needs the `datasets` package (pip install -e '.[bench]'); "
            f"or {ALTERNATIVES}") from None
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as e:  # datasets raises many kinds when offline; all mean "not here"
        reason = (str(e).splitlines() or [""])[0][:200]
        raise DatasetUnavailableError(
            f"could not load {name} ({type(e).__name__}: {reason}); {ALTERNATIVES}") from None
    records = dataset.select(range(min(num_records, len(dataset))))
    return [check_record(r, i, name) for i, r in enumerate(records)]


def load_alpaca_file(path: str | Path) -> list[dict]:
    """Records of a local file: a JSON list of objects, JSON lines, or parquet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix in (".json", ".jsonl"):
        records = _read_json(path)
    else:
        raise ValueError(f"dataset file {path} has an unknown extension {suffix!r}; "
                         "use .json (a list of objects, or JSON lines), .jsonl or .parquet")
    if not records:
        raise ValueError(f"dataset file {path} holds no records")
    return [check_record(r, i, path) for i, r in enumerate(records)]


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset file {path} is not valid JSON or JSON lines: {e}") from None


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs the `pyarrow` package "
                         "(pip install -e '.[bench]'); or convert it to JSON lines") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's error types vary by version
        raise ValueError(f"dataset file {path} is not a readable parquet file: {e}") from None


def check_record(record, index: int, source) -> dict:
    """The record with `input` and `output` filled in, or a ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: record {index} is a {type(record).__name__}, "
                         f"not an object with {RECORD_FIELDS}")
    instruction = record.get("instruction")
    fields = {k: record.get(k) or "" for k in ("input", "output")}
    if not isinstance(instruction, str) or not instruction.strip() \
            or not all(isinstance(v, str) for v in fields.values()):
        raise ValueError(f"{source}: record {index} needs {RECORD_FIELDS}; "
                         f"got keys {sorted(record)}")
    return {"instruction": instruction, **fields}


def alpaca_prompt(record: dict) -> str:
    """A record as a prompt in a plain Alpaca-style layout, ready for the response."""
    parts = [f"### Instruction:\n{record['instruction'].strip()}"]
    if record["input"].strip():
        parts.append(f"### Input:\n{record['input'].strip()}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def few_shot_text(records: list[dict]) -> str:
    """Worked examples (prompt and answer) to share in front of many prompts."""
    return "\n\n".join(alpaca_prompt(r) + r["output"].strip() for r in records) + "\n\n"


# -- synthetic --------------------------------------------------------------------------

def synthetic_requests(num_prompts: int, prompt_len_range: tuple[int, int],
                       output_len_range: tuple[int, int], num_ordinary_tokens: int, bos_id: int,
                       seed: int) -> list[BenchRequest]:
    """<|bos|> then random ordinary tokens; lengths drawn uniformly from the ranges."""
    for name, (low, high) in (("prompt", prompt_len_range), ("output", output_len_range)):
        if not 1 <= low <= high:
            raise ValueError(f"the {name} length range ({low}, {high}) must satisfy 1 <= low <= high")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        prompt_len = rng.randint(*prompt_len_range)
        ids = [bos_id] + [rng.randrange(num_ordinary_tokens) for _ in range(prompt_len - 1)]
        requests.append(BenchRequest(ids, rng.randint(*output_len_range)))
    return requests


def random_tokens(length: int, num_ordinary_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(num_ordinary_tokens) for _ in range(length)]


def with_shared_prefix(requests: list[BenchRequest], prefix_ids: list[int]) -> list[BenchRequest]:
    """Each request with `prefix_ids` right after its <|bos|>, as a system prompt sits."""
    return [BenchRequest(r.prompt_token_ids[:1] + prefix_ids + r.prompt_token_ids[1:], r.max_tokens)
            for r in requests]
