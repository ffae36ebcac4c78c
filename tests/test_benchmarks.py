"""The benchmark suite: dataset loaders, metric arithmetic, the CSV log, the no-cache
baseline, the KV probe, and test_alpaca.py end to end on a tiny random model."""

import csv
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from benchmarks import core_bundle, gpu_targets, local_server, scoring, vs_vllm, workloads
from benchmarks.decode_bandwidth import kv_bytes_per_step, peak_bandwidth_gb_s, weight_bytes_per_step
from benchmarks.kv_probe import KVUsageProbe
from benchmarks.metrics import (RequestRecord, kv_utilisation, parse_size, percentile, summarize,
                                time_per_output_token)
from benchmarks.no_cache import generate_without_cache
from benchmarks.random_checkpoint import tokenizer_with_vocab
from benchmarks.results_csv import COLUMNS, append_runs, read_runs
from microvllm import LLM, RequestMetrics, SamplingParams
from microvllm.model.config import ModelConfig
from microvllm.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parent.parent

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


@pytest.mark.slow  # a subprocess
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


def test_script_reports_host_and_device_ms_per_step_when_asked(checkpoint_dir, tmp_path, capsys):
    import test_alpaca
    test_alpaca.main(["--model-dir", str(checkpoint_dir), "--synthetic", "--num-prompts", "3", "--max-tokens",
                      "3", "--prompt-len-range", "4", "8", "--step-timing", "--csv", "",
                      "--output-json", str(tmp_path / "out.json")])
    assert "host ms / step" in capsys.readouterr().out
    (run,) = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert run["host_ms_per_step"] >= run["device_ms_per_step"] > 0


def test_script_rejects_bad_dataset_input_with_exit_code_2(checkpoint_dir, tmp_path):
    import test_alpaca
    (tmp_path / "bad.jsonl").write_text('{"input": "no instruction"}\n')
    for dataset, message in ((tmp_path / "missing.json", "does not exist"),
                             (tmp_path / "bad.jsonl", "record 0 needs")):
        with pytest.raises(SystemExit) as exit_info:
            test_alpaca.main(["--model-dir", str(checkpoint_dir), "--dataset-path", str(dataset),
                              "--csv", ""])
        assert exit_info.value.code == 2


def test_script_rejects_a_checkpoint_meta_value_of_the_wrong_type_with_exit_code_2(make_checkpoint, capsys):
    import test_alpaca
    model_dir = make_checkpoint()
    (meta_path,) = model_dir.glob("meta_*.json")
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["n_layer"] = "4"  # validation raises TypeError for a str
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        test_alpaca.main(["--model-dir", str(model_dir), "--synthetic", "--num-prompts", "2",
                          "--prompt-len-range", "4", "8", "--max-tokens", "2", "--csv", ""])
    assert exit_info.value.code == 2
    assert "model_config.n_layer must be an int" in capsys.readouterr().err


# -- random checkpoints and the GPU targets -----------------------------------------------

@pytest.mark.parametrize("vocab_size", [265, 1000, 65536])
def test_any_vocab_tokenizer_round_trips_text_and_ends_with_the_special_tokens(vocab_size, tmp_path):
    encoding = tokenizer_with_vocab(vocab_size)
    text = "Hello, world!\n\t123 héllo ωορλδ 日本語 <|bos|>"
    ids = encoding.encode_ordinary(text)
    assert encoding.decode(ids) == text and max(ids) < vocab_size - len(SPECIAL_TOKENS)
    if vocab_size == 65536:  # d20's vocab merges nearly every byte pair
        assert len(ids) < len(text.encode())
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.vocab_size == vocab_size
    assert list(tokenizer.special.values()) == list(range(vocab_size - len(SPECIAL_TOKENS), vocab_size))


def test_tokenizer_vocab_outside_bytes_plus_pairs_is_refused():
    for vocab_size in (264, 256 + 256**2 + 10):
        with pytest.raises(ValueError, match="must be in"):
            tokenizer_with_vocab(vocab_size)


def test_kv_bytes_count_each_layers_window():
    config = ModelConfig(sequence_len=64, vocab_size=265, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                         window_pattern="SL", era="B")
    assert config.window_sizes == [32, 64]
    # contexts 10 and 50: the short layer reads 10 and 33 keys (a window of 32 plus the query)
    assert kv_bytes_per_step(config, [10, 50], 4) == (10 + 33 + 10 + 50) * 2 * 1 * 8 * 4


def test_weight_bytes_read_each_matrix_and_one_embedding_row_per_token(checkpoint_dir):
    model = LLM(checkpoint_dir, num_blocks=8).engine.model
    tables = [model.transformer.wte.weight] + [e.weight for e in model.value_embeds.values()]
    everything = sum(p.nbytes for p in model.parameters())
    assert weight_bytes_per_step(model, 3) == \
        everything - sum(t.nbytes for t in tables) + 3 * sum(t[0].nbytes for t in tables)


@pytest.mark.parametrize("name, gb_s", [("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000),
                                        ("NVIDIA H200", 4800), ("NVIDIA A100-SXM4-80GB", 2039),
                                        ("NVIDIA GH200 480GB", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_bandwidth_is_known_by_device_name(name, gb_s, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert peak_bandwidth_gb_s(torch.device("cuda")) == gb_s
    assert peak_bandwidth_gb_s(torch.device("cpu")) is None


def test_gpu_targets_checkpoint_is_reused_and_another_shape_refused(tmp_path):
    tiny = gpu_targets.SHAPES["tiny"]
    directory = gpu_targets.ensure_checkpoint(tmp_path / "ckpt", tiny)
    written = (directory / "model_000000.pt").stat().st_mtime_ns
    assert gpu_targets.ensure_checkpoint(directory, tiny) == directory
    assert (directory / "model_000000.pt").stat().st_mtime_ns == written
    deeper = dataclasses.replace(tiny, model_config={**tiny.model_config, "n_layer": 3})
    with pytest.raises(ValueError, match="another shape"):
        gpu_targets.ensure_checkpoint(directory, deeper)


def test_gpu_targets_run_end_to_end_on_cpu_at_the_tiny_shape(tmp_path, capsys):
    gpu_targets.main(["--shape", "tiny", "--device", "cpu", "--num-requests", "4", "--checkpoint-dir",
                      str(tmp_path / "ckpt"), "--output-json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "output tok/s" in out and "cuda graphs / eager output tok/s" in out
    assert "of peak bandwidth" not in out  # a CPU's peak is unknown
    report = json.loads((tmp_path / "out.json").read_text())
    shape = gpu_targets.SHAPES["tiny"]
    requests, _ = gpu_targets.build_requests(shape, Tokenizer.from_dir(tmp_path / "ckpt" / "tokenizer"), 4, 0)
    assert [m["mode"] for m in report["modes"]] == ["cuda graphs", "eager"]
    for mode in report["modes"]:
        assert mode["output_tokens"] == sum(r.max_tokens for r in requests)  # ignore_eos
        assert mode["kv_blocks"] >= 1 and mode["gpu_memory_in_use"] is None
        assert [d["batch_size"] for d in mode["decode"]] == list(shape.decode_batches)
        for d in mode["decode"]:
            assert d["mean_context"] > shape.decode_prompt_len and d["bandwidth_gb_s"] > 0
            assert d["utilisation"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_targets_bad_device_exits_2_before_writing_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_targets.main(["--device", "cuda", "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2 and not (tmp_path / "ckpt").exists()


def test_vs_vllm_times_our_engine_after_a_warm_up_on_other_prompts(checkpoint_dir, monkeypatch):
    prompts, max_tokens = vs_vllm.make_workload(3, (2, 6), (2, 4), 256)
    warmup_prompts, warmup_max_tokens = vs_vllm.make_workload(3, (2, 6), (2, 4), 256, seed=1)
    assert warmup_prompts != prompts
    seen = []
    monkeypatch.setattr(LLM, "generate", lambda self, p, *a, _generate=LLM.generate, **k:
                        seen.append(p) or _generate(self, p, *a, **k))
    result = vs_vllm.run_ours(str(checkpoint_dir), dict(prompts=prompts, max_tokens=max_tokens,
                              warmup_prompts=warmup_prompts, warmup_max_tokens=warmup_max_tokens), None)
    assert seen == [warmup_prompts, prompts]
    assert [len(tokens) for tokens in result["outputs"]] == max_tokens
    assert result["tok_s"] > 0 and result["dtype"] == "float32"


def test_vs_vllm_matching_counts_identical_outputs_and_agreeing_leading_tokens():
    same, prefix = vs_vllm.matching([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert same == 0.5
    assert prefix == pytest.approx((1 + 1 / 3) / 2)


def test_no_cache_baseline_runs_on_a_bfloat16_engine_model(checkpoint_dir):
    # on CPUs with bf16 instructions the engine's linears are packed and keep no .weight
    model = LLM(checkpoint_dir, dtype="bfloat16", num_blocks=64, max_num_seqs=2).engine.model
    result = generate_without_cache(model, [[256, 10, 20], [256, 5]], [4, 2], max_num_seqs=2, max_model_len=64)
    assert [len(o.token_ids) for o in result.outputs] == [4, 2]


def test_decode_kernel_benchmark_times_a_small_shape():
    from benchmarks.decode_kernel import time_kernel
    from microvllm.cpu.kernels import load_library
    if load_library() is None:
        pytest.skip("no C compiler for the CPU kernels")
    ns, gb_s = time_kernel((2, 40, 4, 2, 64), torch.bfloat16)
    assert ns > 0 and gb_s > 0


def test_chunk_attention_benchmark_times_both_paths_on_a_small_step():
    from benchmarks.chunk_attention import time_shape
    from microvllm.cpu.kernels import load_library
    if load_library() is None:
        pytest.skip("no C compiler for the CPU kernels")
    seconds = time_shape(2, 5, 40, torch.bfloat16)
    assert seconds["kernel"] > 0 and seconds["sdpa"] > 0


# -- scoring ------------------------------------------------------------------------------

def test_scoring_prompts_are_each_context_followed_by_its_continuations():
    prompts = scoring.scoring_prompts(3, 4, (10, 20), (2, 5), 100, seed=0)
    assert len(prompts) == 12 and prompts == scoring.scoring_prompts(3, 4, (10, 20), (2, 5), 100, seed=0)
    for c in range(3):
        group = prompts[4 * c:4 * c + 4]
        context = next(n for n in range(len(group[0])) if len({tuple(p[:n + 1]) for p in group}) > 1)
        assert 10 <= context <= 20
        assert all(2 <= len(p) - context <= 5 and max(p) < 100 for p in group)
    assert len({tuple(prompts[4 * c][:10]) for c in range(3)}) == 3


def test_scoring_requests_hold_the_longest_prompts_first_batch_size_to_a_request():
    prompts = [[0] * n for n in (3, 9, 5, 7, 1)]
    assert scoring.request_batches(prompts, 2) == [[1, 3], [2, 0], [4]]


def test_busy_threads_are_those_that_ran_a_share_of_the_wall_time():
    before = {(1, 1): 0.0, (1, 2): 5.0}
    after = {(1, 1): 0.5, (1, 2): 5.1, (2, 3): 0.3}  # thread (2, 3) started between the snapshots
    assert local_server.busy_threads(before, after, wall_s=1.0) == 2


def test_thread_cpu_seconds_cover_this_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        seconds = local_server.thread_cpu_seconds(os.getpid())
        assert {pid for pid, _ in seconds} == {os.getpid(), child.pid}
        assert (os.getpid(), threading.get_native_id()) in seconds
    finally:
        child.kill()
        child.wait()


def test_core_bundle_has_a_task_of_each_kind_in_nanochats_layout(tmp_path):
    import yaml
    bundle = core_bundle.write_bundle(tmp_path / "bundle", examples_per_task=5)
    tasks = yaml.safe_load((bundle / "core.yaml").read_text())["icl_tasks"]
    assert sorted(t["icl_task_type"] for t in tasks) == ["language_modeling", "multiple_choice",
                                                         "multiple_choice", "schema"]
    fields = {"multiple_choice": {"query", "choices", "gold"}, "schema": {"context_options", "continuation", "gold"},
              "language_modeling": {"context", "continuation"}}
    for task in tasks:
        lines = (bundle / "eval_data" / task["dataset_uri"]).read_text().splitlines()
        assert len(lines) == 5 and all(json.loads(line).keys() == fields[task["icl_task_type"]] for line in lines)
    with open(bundle / "eval_meta_data.csv", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    assert baselines.keys() == {t["label"] for t in tasks}


@pytest.mark.parametrize("flag", ["--batch-size", "--concurrency", "--rounds"])
def test_scoring_counts_below_1_exit_2_before_writing_a_checkpoint(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scoring.main([flag, "0", "--dir", str(tmp_path)])
    assert exit_info.value.code == 2 and f"{flag} must be an int >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # a server and a worker process
def test_scoring_quick_run_prints_both_workloads_and_the_exact_served_check(tmp_path, capsys):
    scoring.main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "16 prompts" in out and "CPUs (avx2" in out
    assert "| (a) served, lm-eval local-completions" in out and "| (b) offline, LLM.generate" in out
    assert "equal its offline ones, the same batches in the same order (the warm-up): yes, exactly" in out
