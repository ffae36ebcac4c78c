"""benchmark_results.csv: one row per run, appended, so results pile up across invocations.

Rows of one invocation share a `run_id`, so the plots can put its modes side by side.
"""

import csv
from datetime import datetime, timezone
from pathlib import Path

from .metrics import SUMMARY_FIELDS, RunSummary

COLUMNS = ["timestamp", "run_id", "experiment", "model", "device"] + SUMMARY_FIELDS


def append_runs(path: str | Path, summaries: list[RunSummary], run_id: str, experiment: str,
                model: str, device: str) -> None:
    path = Path(path)
    is_new = not path.exists() or path.stat().st_size == 0
    if not is_new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise ValueError(f"{path} has other columns than this version writes; "
                             "move it aside or pass another --csv path")
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if is_new:
            writer.writeheader()
        for s in summaries:
            writer.writerow({"timestamp": timestamp, "run_id": run_id, "experiment": experiment,
                             "model": model, "device": device, **s.as_dict()})


def read_runs(path: str | Path) -> list[dict]:
    """The rows as dicts of strings ('' where a value was None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist; run test_alpaca.py first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
