"""Data-parallel generation on a local two-CPU Ray cluster: replicas behave as one engine."""

import json
import sys
import warnings

import pytest

from microvllm import LLM, BeamSearchParams, SamplingParams, StructuredOutputsParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # each test starts or shares a local Ray cluster

from microvllm.distributed import Router  # noqa: E402
from microvllm.ray_data import LLMPredictor  # noqa: E402

PROMPTS = ["hello there", "the cat sat", "once upon a time", "a b c d", "zz", "to be or not to be"]
PARAMS = [SamplingParams(max_tokens=12, temperature=0.0),
          SamplingParams(max_tokens=12, temperature=1.0, seed=7),
          SamplingParams(max_tokens=12, temperature=0.8, top_k=20)]  # seed drawn by the engine


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


# replicas run in Ray's worker processes, out of reach of conftest's float32 default: the
# tests that hold them to one engine token for token ask for float32 by name
FLOAT32 = dict(dtype="float32")


@pytest.fixture(scope="module")
def one_llm(checkpoint_dir):
    return LLM(checkpoint_dir, max_num_seqs=4, **FLOAT32)


def params_for(prompts):
    return [PARAMS[i % len(PARAMS)] for i in range(len(prompts))]


def assert_same_outputs(got, expected):
    assert [o.request_id for o in got] == [o.request_id for o in expected]
    for g, e in zip(got, expected):
        assert g.prompt_token_ids == e.prompt_token_ids
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs]
        assert [c.text for c in g.outputs] == [c.text for c in e.outputs]


class TestOnePool:
    """Tests sharing one pool of two replicas: the local cluster's two CPUs, both taken."""

    @pytest.fixture(scope="class")
    def pool_llm(self, local_ray, checkpoint_dir):
        llm = LLM(checkpoint_dir, data_parallel_size=2, cpu_threads_per_replica=1, max_num_seqs=4, **FLOAT32)
        yield llm
        llm.engine.shutdown()

    def test_the_kv_blocks_of_every_replica_count_before_the_first_step(self, pool_llm, one_llm):
        # the first test of the class: the pool has not stepped yet
        assert pool_llm.engine.stats.total_blocks == 2 * one_llm.engine.stats.total_blocks > 0

    def test_outputs_match_one_engine_in_input_order(self, pool_llm, one_llm):
        prompts = PROMPTS * 2
        got = pool_llm.generate(prompts, params_for(prompts), use_tqdm=False)
        assert_same_outputs(got, one_llm.generate(prompts, params_for(prompts), use_tqdm=False))

    def test_structured_outputs_match_one_engine(self, pool_llm, one_llm):
        pytest.importorskip("xgrammar")
        words = StructuredOutputsParams(regex=r"[a-z]{2,6}( [a-z]{2,6}){0,2}")
        params = [SamplingParams(max_tokens=24, temperature=1.0, seed=3, structured_outputs=words),
                  SamplingParams(max_tokens=8, temperature=0.0,
                                 structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))] * 3
        assert_same_outputs(pool_llm.generate(PROMPTS, params, use_tqdm=False),
                            one_llm.generate(PROMPTS, params, use_tqdm=False))

    def test_beam_search_is_refused_with_the_setting_that_allows_it(self, pool_llm):
        with pytest.raises(ValueError, match="data_parallel_size=1"):
            pool_llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=2, max_tokens=4))
        assert not pool_llm.has_unfinished_requests()

    def test_chat_matches_one_engine(self, pool_llm, one_llm):
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
        greedy = SamplingParams(max_tokens=8, temperature=0.0)
        assert_same_outputs(pool_llm.chat(conversations, greedy, use_tqdm=False),
                            one_llm.chat(conversations, greedy, use_tqdm=False))

    def test_prompts_sharing_a_prefix_keep_their_cache_hits(self, pool_llm, one_llm):
        prefix = list(range(10, 58))  # three full blocks of 16
        prompts = [{"prompt_token_ids": prefix + [100 + i, 101 + i]} for i in range(8)]
        greedy = SamplingParams(max_tokens=4, temperature=0.0)
        one_before = one_llm.engine.stats.cached_prompt_tokens
        pool_before = pool_llm.engine.stats.cached_prompt_tokens
        assert_same_outputs(pool_llm.generate(prompts, greedy, use_tqdm=False),
                            one_llm.generate(prompts, greedy, use_tqdm=False))
        one_cached = one_llm.engine.stats.cached_prompt_tokens - one_before
        pool_cached = pool_llm.engine.stats.cached_prompt_tokens - pool_before
        assert one_cached > 0
        assert pool_cached >= 0.9 * one_cached

    def test_a_refused_prompt_fails_the_call_and_leaves_the_pool_usable(self, pool_llm, one_llm):
        with pytest.raises(ValueError, match="out of vocabulary"):
            pool_llm.generate([PROMPTS[0], [1, 2, 10**6]], use_tqdm=False)
        assert not pool_llm.has_unfinished_requests()
        assert_same_outputs(pool_llm.generate(PROMPTS[:2], PARAMS[0], use_tqdm=False),
                            one_llm.generate(PROMPTS[:2], PARAMS[0], use_tqdm=False))

    def test_abort_reaches_the_replica_holding_the_request(self, pool_llm, monkeypatch):
        # one engine step per replica call: no request can finish before the abort
        monkeypatch.setattr(pool_llm.engine, "step_budget_s", 0.0)
        long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        ids = [pool_llm.add_request(p, long) for p in PROMPTS[:4]]
        finished = pool_llm.step()
        pool_llm.abort(ids[1])
        while pool_llm.has_unfinished_requests():
            finished += pool_llm.step()
        assert sorted(o.request_id for o in finished) == sorted(ids[:1] + ids[2:])
        busy = ray.get([r.run.remote([], 0.0) for r in pool_llm.engine.replicas])
        assert all(not finished for finished, _ in busy)  # nothing left running there

    def test_automatic_request_ids_skip_ids_given_by_hand(self, pool_llm):
        greedy = SamplingParams(max_tokens=2, temperature=0.0)
        first = int(pool_llm.add_request(PROMPTS[0], greedy))  # where the pool's counter stands
        mine = [str(first)] + [pool_llm.add_request(PROMPTS[0], greedy, request_id=str(first + i))
                               for i in (1, 3)]
        outs = pool_llm.generate(PROMPTS[:4], greedy, use_tqdm=False)
        ids = [o.request_id for o in outs]
        assert len(set(ids)) == 4 and not set(ids) & set(mine)
        finished = []
        while pool_llm.has_unfinished_requests():
            finished += pool_llm.step()
        assert sorted(o.request_id for o in finished) == sorted(mine)

    def test_a_second_pool_finds_no_free_cpus(self, pool_llm, checkpoint_dir, monkeypatch):
        monkeypatch.setattr("microvllm.distributed.pool.RELEASE_WAIT_S", 0.0)
        with pytest.raises(ValueError, match="needs 2 CPUs"):
            LLM(checkpoint_dir, data_parallel_size=2, cpu_threads_per_replica=1)


def test_a_killed_replica_has_its_requests_rerun_once(local_ray, checkpoint_dir):
    llm = LLM(checkpoint_dir, data_parallel_size=2, cpu_threads_per_replica=1, max_num_seqs=4, **FLOAT32)
    llm.engine.step_budget_s = 0.0  # one engine step per call, so the kill lands mid-run
    params = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)  # seeds drawn by the pool
    prompts = PROMPTS * 2
    ids = [llm.add_request(p, params) for p in prompts]
    finished = llm.step()
    victim = next(r.replica for r in llm.engine.requests.values())
    ray.kill(llm.engine.replicas[victim])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while llm.has_unfinished_requests():
            finished += llm.step()
    assert len([w for w in caught if "died" in str(w.message)]) == 1
    assert sorted(o.request_id for o in finished) == sorted(ids)
    expected = LLM(checkpoint_dir, max_num_seqs=4, **FLOAT32).generate(prompts, params, use_tqdm=False)
    by_id = {o.request_id: o for o in finished}
    for request_id, e in zip(ids, expected):
        assert by_id[request_id].outputs[0].token_ids == e.outputs[0].token_ids
    llm.engine.shutdown()


def test_a_replica_that_cannot_start_fails_at_once_with_its_own_error(local_ray, checkpoint_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(tmp_path / "missing", tokenizer=str(checkpoint_dir / "tokenizer"), data_parallel_size=2,
            cpu_threads_per_replica=1)


def test_ray_data_predictor_streams_a_dataset_to_jsonl(local_ray, checkpoint_dir, one_llm, tmp_path):
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    ds = ray.data.from_items([{"prompt": p, "row": i} for i, p in enumerate(PROMPTS)])
    ds.map_batches(LLMPredictor, batch_size=3, concurrency=1, num_cpus=1,
                   fn_constructor_kwargs={"model": str(checkpoint_dir), "sampling_params": greedy,
                                          "cpu_threads": 1, **FLOAT32}).write_json(str(tmp_path / "out"))
    rows = [json.loads(line) for f in sorted((tmp_path / "out").glob("*.json"))
            for line in f.read_text().splitlines()]
    expected = one_llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert sorted((r["row"], r["generated_text"]) for r in rows) == \
        [(i, o.outputs[0].text) for i, o in enumerate(expected)]


def test_benchmark_compares_one_engine_with_replicas(local_ray, checkpoint_dir, tmp_path, capsys):
    import test_alpaca
    from benchmarks.results_csv import read_runs

    csv = tmp_path / "results.csv"
    assert test_alpaca.main(["--model-dir", str(checkpoint_dir), "--synthetic", "--prefix-sharing",
                             "--prefix-len", "32", "--num-prompts", "6", "--max-tokens", "4",
                             "--prompt-len-range", "4", "12", "--data-parallel-size", "2",
                             "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "throughput ratio" in out and "cached prompt tokens 2 replicas" in out
    assert [(r["experiment"], r["mode"]) for r in read_runs(csv)] == \
        [("data-parallel", "paged"), ("data-parallel", "2 replicas")]


# -- routing, without a cluster ----------------------------------------------------------

def test_router_sends_a_shared_first_block_to_one_replica_until_it_is_far_ahead():
    router = Router(2, block_size=4, spill_tokens=100)
    shared = [1, 2, 3, 4, 5]
    assert [router.route(shared, 40) for _ in range(3)] == [0, 0, 0]
    assert router.route(shared, 40) == 1  # replica 0 is 120 tokens ahead: the prefix spreads
    assert router.route(shared, 40) == 1  # now both hold it: the less loaded one takes it


def test_router_balances_outstanding_tokens_not_requests():
    router = Router(2, block_size=4)
    assert router.route([1, 2], 1000) == 0
    assert [router.route([i, 9], 10) for i in range(5)] == [1] * 5
    router.finish(0, 1000)
    assert router.route([7, 7], 10) == 0


def test_router_forgets_a_removed_replica():
    router = Router(2, block_size=4)
    shared = [1, 2, 3, 4, 5]
    assert router.route(shared, 10) == 0
    router.remove(0)
    assert router.route(shared, 10) == 1
