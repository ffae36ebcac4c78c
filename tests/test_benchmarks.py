"""The benchmark suite: dataset loaders, metric arithmetic, the CSV log, the no-cache
baseline, the KV probe, and test_alpaca.py end to end on a tiny random model."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import workloads  # noqa: E402
from benchmarks.kv_probe import KVUsageProbe  # noqa: E402
from benchmarks.metrics import (RequestRecord, kv_utilisation, parse_size, percentile, summarize,  # noqa: E402
                                time_per_output_token)
from benchmarks.no_cache import generate_without_cache  # noqa: E402
from benchmarks.results_csv import COLUMNS, append_runs, read_runs  # noqa: E402
from microvllm import LLM, RequestMetrics, SamplingParams  # noqa: E402

RECORDS = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


# -- dataset loaders ----------------------------------------------------------------------

def test_json_list_loads_and_fills_missing_optional_fields(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Say hi."}] + RECORDS))
    records = workloads.load_alpaca_file(path)
    assert records[0] == {"instruction": "Say hi.", "input": "", "output": ""}
    assert records[2]["input"] == "2 and 3"


@pytest.mark.parametrize("name", ["alpaca.jsonl", "alpaca.json"])
def test_json_lines_load_from_jsonl_or_json(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert workloads.load_alpaca_file(path) == RECORDS


def test_parquet_loads(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")  # parquet support needs pyarrow
    import pyarrow
    path = tmp_path / "alpaca.parquet"
    pq.write_table(pyarrow.Table.from_pylist(RECORDS), path)
    assert workloads.load_alpaca_file(path) == RECORDS


def test_missing_dataset_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        workloads.load_alpaca_file(tmp_path / "nope.json")


def test_malformed_record_is_named_by_index(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "no instruction"}) + "\n")
    with pytest.raises(ValueError, match=r"record 1 needs a non-empty string 'instruction'"):
        workloads.load_alpaca_file(path)


def test_invalid_json_and_unknown_extension_are_value_errors(tmp_path):
    (tmp_path / "bad.json").write_text("[{\"instruction\": ")
    (tmp_path / "data.csv").write_text("instruction\nhi\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        workloads.load_alpaca_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown extension"):
        workloads.load_alpaca_file(tmp_path / "data.csv")


def test_hub_dataset_without_datasets_package_names_the_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(workloads.DatasetUnavailableError, match="--dataset-path.*--synthetic"):
        workloads.load_hf_alpaca(4)


def test_alpaca_prompt_shows_input_only_when_given():
    without, with_input = (workloads.alpaca_prompt(workloads.check_record(r, 0, "t")) for r in RECORDS)
    assert "### Input" not in without and without.endswith("### Response:\n")
    assert "### Input:\n2 and 3" in with_input


def test_synthetic_requests_are_seeded_and_within_ranges():
    make = lambda seed: workloads.synthetic_requests(20, (5, 9), (2, 4), 100, 7, seed)
    requests = make(0)
    assert requests == make(0) and requests != make(1)
    for r in requests:
        assert 5 <= len(r.prompt_token_ids) <= 9 and 2 <= r.max_tokens <= 4
        assert r.prompt_token_ids[0] == 7 and all(t < 100 for t in r.prompt_token_ids[1:])
    with pytest.raises(ValueError, match="prompt length range"):
        workloads.synthetic_requests(1, (9, 5), (2, 4), 100, 7, 0)


def test_shared_prefix_goes_right_after_bos():
    requests = [workloads.BenchRequest([7, 1, 2], 3), workloads.BenchRequest([7, 5], 3)]
    shared = workloads.with_shared_prefix(requests, [40, 41])
    assert [r.prompt_token_ids for r in shared] == [[7, 40, 41, 1, 2], [7, 40, 41, 5]]


# -- metrics ------------------------------------------------------------------------------

def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([], 50) is None


def test_time_per_output_token_excludes_the_first_token():
    record = RequestRecord(10, 5, RequestMetrics(100.0, 101.0, 103.0))
    assert time_per_output_token(record) == 0.5
    assert time_per_output_token(RequestRecord(10, 1, RequestMetrics(100.0, 101.0, 101.0))) is None


def test_kv_utilisation_is_tokens_held_over_slots_in_used_blocks():
    assert kv_utilisation(24, 2, 16) == 0.75
    assert kv_utilisation(0, 0, 16) == 0.0


def test_summary_throughputs_and_latency_percentiles():
    records = [RequestRecord(10, 4, RequestMetrics(0.0, 1.0, 4.0)),
               RequestRecord(30, 6, RequestMetrics(0.0, 2.0, 7.0))]
    s = summarize("paged", records, wall_s=2.0, computed_tokens=48, peak_running_seqs=2)
    assert (s.input_tokens, s.output_tokens) == (40, 10)
    assert (s.output_tok_s, s.total_tok_s, s.requests_s) == (5.0, 25.0, 1.0)
    assert s.ttft_p50_s == 1.5 and s.tpot_p50_s == 1.0
    assert s.kv_util_at_peak is None and s.preemptions is None


def test_parse_size_accepts_binary_suffixes():
    assert parse_size("1024") == 1024
    assert parse_size("256M") == 256 * 1024**2
    assert parse_size("1.5g") == 1536 * 1024**2
    assert parse_size("64KiB") == 64 * 1024
    for bad in ("", "-1M", "12X", "0"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


# -- CSV log ------------------------------------------------------------------------------

def _summary(mode):
    return summarize(mode, [RequestRecord(3, 2, RequestMetrics(0.0, 0.5, 1.0))], 1.0, 5, 1)


def test_csv_writes_the_header_once_and_appends_rows(tmp_path):
    path = tmp_path / "results.csv"
    append_runs(path, [_summary("paged"), _summary("contiguous")], "run1", "compare", "m", "cpu")
    append_runs(path, [_summary("paged")], "run2", "single", "m", "cpu")
    with open(path) as f:
        lines = list(csv.reader(f))
    assert lines[0] == COLUMNS and COLUMNS.count("timestamp") == 1
    assert [line[0] == "timestamp" for line in lines].count(True) == 1
    rows = read_runs(path)
    assert [(r["run_id"], r["mode"]) for r in rows] == [("run1", "paged"), ("run1", "contiguous"),
                                                         ("run2", "paged")]
    assert rows[0]["output_tokens"] == "2" and rows[0]["peak_blocks"] == ""


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        append_runs(path, [_summary("paged")], "run1", "single", "m", "cpu")


# -- engine-backed pieces -----------------------------------------------------------------

def test_no_cache_baseline_matches_the_engine_greedy_tokens(checkpoint_dir):
    llm = LLM(checkpoint_dir, num_blocks=64, max_num_seqs=4)
    prompts = [[256, 10, 20, 30], [256, 5], [256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11], [256, 99, 98]]
    max_tokens = [6, 3, 9, 1]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    result = generate_without_cache(llm.engine.model, prompts, max_tokens, max_num_seqs=3, max_model_len=64)
    assert [o.token_ids for o in result.outputs] == expected
    assert result.peak_batch_size == 3
    # batch 1 pads to its longest sequence every step; batch 2 is one request of 3 tokens
    assert result.computed_tokens > sum(len(p) + n - 1 for p, n in zip(prompts, max_tokens))


def test_kv_probe_peak_agrees_with_engine_stats_and_counts_held_tokens(checkpoint_dir):
    llm = LLM(checkpoint_dir, block_size=64, num_blocks=4, enable_prefix_caching=False)
    probe = KVUsageProbe(llm.engine)
    llm.generate([[256] + [1] * 9, [256] + [2] * 19], SamplingParams(max_tokens=5, ignore_eos=True),
                 use_tqdm=False)
    usage = probe.usage()
    assert usage.peak_blocks == llm.engine.stats.peak_used_blocks == 2
    # the fullest step at the peak writes the last fed-back tokens: 10 + 4 and 20 + 4 tokens
    assert usage.tokens_at_peak == 38
    assert kv_utilisation(usage.tokens_at_peak, usage.peak_blocks, usage.block_size) == 38 / 128


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "test_alpaca.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_script_runs_synthetic_end_to_end(checkpoint_dir, tmp_path):
    out = run_script("--model-dir", str(checkpoint_dir), "--synthetic", "--num-prompts", "4",
                     "--max-tokens", "4", "--prompt-len-range", "4", "12", "--output-json", "out.json",
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "output tokens/s" in out.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    (run,) = report["runs"]
    assert (run["mode"], run["num_prompts"], run["output_tokens"]) == ("paged", 4, 16)
    assert run["peak_blocks"] >= 1 and 0 < run["kv_util_at_peak"] <= 1
    assert [r["mode"] for r in read_runs(tmp_path / "benchmark_results.csv")] == ["paged"]


def test_script_rejects_bad_dataset_input_with_exit_code_2(checkpoint_dir, tmp_path):
    import test_alpaca
    (tmp_path / "bad.jsonl").write_text('{"input": "no instruction"}\n')
    for dataset, message in ((tmp_path / "missing.json", "does not exist"),
                             (tmp_path / "bad.jsonl", "record 0 needs")):
        with pytest.raises(SystemExit) as exit_info:
            test_alpaca.main(["--model-dir", str(checkpoint_dir), "--dataset-path", str(dataset),
                              "--csv", ""])
        assert exit_info.value.code == 2
