"""Aborts, interrupts, preemption storms and numerical safety."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.cpu.linear import packs_linears

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_abort_frees_blocks_at_once(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    keep = llm.add_request([1, 2, 3] * 10, GREEDY)
    drop = llm.add_request([4, 5, 6] * 10, SamplingParams(n=3, max_tokens=30, ignore_eos=True))
    for _ in range(3):
        llm.step()
    used = llm.engine.block_manager.num_used_blocks
    llm.abort(drop)
    assert llm.engine.block_manager.num_used_blocks < used
    finished = []
    while llm.has_unfinished_requests():
        finished += llm.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in finished] == [(drop, "abort"), (keep, "length")]
    assert llm.engine.block_manager.num_used_blocks == 0
    llm.abort("no-such-request")  # aborting twice, or an unknown id, is harmless


def test_keyboard_interrupt_inside_generate_leaves_engine_usable(checkpoint_dir, monkeypatch):
    llm = LLM(checkpoint_dir)
    expected = llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    execute = llm.engine.runner.execute
    calls = {"n": 0}

    def interrupted(scheduled, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return execute(scheduled, *args)

    monkeypatch.setattr(llm.engine.runner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[i, i + 1] for i in range(20)], GREEDY, use_tqdm=False)
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.has_unfinished_requests()
    assert llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


@pytest.mark.slow
def test_preemption_storm_300_requests_through_a_cache_for_4(checkpoint_dir):
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(4, 40))] for _ in range(300)]
    # one batch that never preempts: greedy outputs do not depend on the batch (test_batching_invariance.py)
    roomy = LLM(checkpoint_dir)
    alone = [o.outputs[0].token_ids for o in roomy.generate(prompts, GREEDY, use_tqdm=False)]
    assert roomy.engine.stats.preemptions == 0
    # 4 sequences of max_model_len=64 tokens in blocks of 8
    tight = LLM(checkpoint_dir, block_size=8, num_blocks=32)
    outs = tight.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert tight.engine.stats.preemptions > 0
    assert tight.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_long_context_gives_finite_logprobs(checkpoint_dir, dtype, monkeypatch):
    # float16 runs on CUDA; on a CPU it would run as bfloat16, unless kept as here
    monkeypatch.setattr("microvllm.platform.cpu.CpuPlatform.runnable_dtype", lambda self, dtype: dtype)
    llm = LLM(checkpoint_dir, dtype=dtype)
    prompt = [random.Random(0).randrange(256) for _ in range(56)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=7, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert all(torch.isfinite(torch.tensor(e[t].logprob)) for e, t in zip(out.logprobs, out.token_ids))


def test_float16_overflow_is_explained(checkpoint_dir, monkeypatch):
    # float16 runs on CUDA; on a CPU it would run as bfloat16, unless kept as here
    monkeypatch.setattr("microvllm.platform.cpu.CpuPlatform.runnable_dtype", lambda self, dtype: dtype)
    llm = LLM(checkpoint_dir, dtype="float16")
    fc = llm.engine.model.transformer.h[0].mlp.c_fc.weight
    original = fc.clone()
    fc.mul_(1000)  # relu(x)^2 now far exceeds float16's range of 65504
    with pytest.raises(FloatingPointError, match="float16 overflowed.*bfloat16"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    fc.copy_(original)
    assert llm.engine.block_manager.num_used_blocks == 0
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_generate_does_not_swallow_requests_added_by_hand(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    by_hand = llm.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    outs = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert len(outs) == 1 and outs[0].request_id != by_hand
    assert [o.request_id for o in llm.step()] == [by_hand]


# -- valid input that once gave wrong output or crashed ---------------------------------

def test_stop_strings_are_looked_for_only_after_min_tokens(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    free = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop, min_tokens = free.text[5:7], 12
    protected = llm.tokenizer.decode(free.token_ids[:min_tokens])
    assert free.text.find(stop) + len(stop) <= len(protected)  # found early without min_tokens
    out = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                                               min_tokens=min_tokens), use_tqdm=False)[0].outputs[0]
    # the first occurrence that ends in text produced after the first min_tokens tokens
    later = free.text.find(stop, len(protected) - len(stop) + 1)
    assert out.text == (free.text if later < 0 else free.text[:later])
    assert len(out.token_ids) > min_tokens


def test_tiny_temperatures_sample_greedily(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    greedy = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    params = [SamplingParams(temperature=t, seed=3, max_tokens=8, ignore_eos=True) for t in (1e-40, 1e-6, 0.8)]
    outs = llm.generate([[5, 6, 7]] * 3, params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == greedy and outs[1].outputs[0].token_ids == greedy
    alone = llm.generate([[5, 6, 7]], params[2], use_tqdm=False)[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == alone


def test_top_k_above_the_vocabulary_in_a_mixed_batch(checkpoint_dir):
    llm = LLM(checkpoint_dir)  # vocab 265
    params = [SamplingParams(top_k=k, seed=1, max_tokens=8, ignore_eos=True) for k in (5, 1000, -1)]
    outs = [o.outputs[0].token_ids for o in llm.generate([[1, 2]] * 3, params, use_tqdm=False)]
    assert outs[1] == outs[2]  # k beyond the vocabulary keeps every token
    assert outs[0] == llm.generate([[1, 2]], params[0], use_tqdm=False)[0].outputs[0].token_ids


WATCHED = SamplingParams(temperature=0.7, seed=5, max_tokens=12, ignore_eos=True, stop=["\x00\x01\x02"],
                         logprobs=2)


def run_by_hand(llm, prompts, params=WATCHED):
    """Outputs by request, stepping to the end; KeyboardInterrupts are caught and stepping goes on."""
    ids = [llm.add_request(p, params) for p in prompts]
    outputs, interrupts = {}, 0
    while llm.has_unfinished_requests():
        try:
            outputs.update((o.request_id, o) for o in llm.step())
        except KeyboardInterrupt:
            interrupts += 1
    assert llm.engine.block_manager.num_used_blocks == 0
    return [(outputs[i].outputs[0].token_ids, outputs[i].outputs[0].text,
             [e[t].logprob for e, t in zip(outputs[i].outputs[0].logprobs, outputs[i].outputs[0].token_ids)])
            for i in ids], interrupts


PROMPTS = [[i, i + 1, i + 2] * (1 + i % 4) for i in range(12)]


@pytest.fixture(scope="module")
def uninterrupted(checkpoint_dir):
    return run_by_hand(LLM(checkpoint_dir, block_size=8, num_blocks=24), PROMPTS)[0]


@pytest.mark.parametrize("where", ["decode", "execute"])
def test_interrupted_steps_leave_the_engine_as_if_they_had_not_started(checkpoint_dir, monkeypatch,
                                                                       uninterrupted, where):
    # a small cache, so steps also preempt and re-admit
    llm = LLM(checkpoint_dir, block_size=8, num_blocks=24)
    target = llm.engine.tokenizer if where == "decode" else llm.engine.runner
    name = "decode" if where == "decode" else "execute"
    original, rng, interrupts = getattr(target, name), random.Random(0), [0]

    def sometimes_interrupted(*args, **kwargs):
        if interrupts[0] < 12 and rng.random() < 0.3:
            interrupts[0] += 1
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, sometimes_interrupted)
    outputs, interrupts = run_by_hand(llm, PROMPTS)
    assert interrupts >= 3 and outputs == uninterrupted


@pytest.mark.parametrize("phase", ["schedule", "update"])
def test_ctrl_c_during_bookkeeping_waits_for_it_to_finish(checkpoint_dir, monkeypatch, uninterrupted, phase):
    llm = LLM(checkpoint_dir, block_size=8, num_blocks=24)
    scheduler = llm.engine.scheduler
    original, calls = getattr(scheduler, phase), [0]

    def with_ctrl_c(*args):
        calls[0] += 1
        if calls[0] % 5 == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs at once, inside the bookkeeping
        return original(*args)

    monkeypatch.setattr(scheduler, phase, with_ctrl_c)
    outputs, interrupts = run_by_hand(llm, PROMPTS)
    assert interrupts >= 3 and outputs == uninterrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_threads_sharing_one_llm_take_turns(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    batches = [[[t, i, i + 1] for i in range(6)] for t in range(4)]
    params = SamplingParams(temperature=0.8, seed=2, max_tokens=10, ignore_eos=True)
    expected = [[o.outputs[0].token_ids for o in llm.generate(b, params, use_tqdm=False)] for b in batches]
    results, errors = {}, []

    def work(t):
        try:
            for _ in range(3):
                outs = llm.generate(batches[t], params, use_tqdm=False)
                results.setdefault(t, []).append([o.outputs[0].token_ids for o in outs])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def by_hand():
        try:
            ids = [llm.add_request([9, 9, i], params) for i in range(5)]
            done = set()
            while len(done) < len(ids):
                done |= {o.request_id for o in llm.step()}
            results["by_hand"] = done == set(ids)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)] + [threading.Thread(target=by_hand)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert all(results[t] == [expected[t]] * 3 for t in range(4)) and results["by_hand"]
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.has_unfinished_requests()


def test_automatic_request_ids_skip_ids_given_by_hand(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    mine = [llm.add_request([1, 2], GREEDY, request_id=str(i)) for i in (1, 3)]
    outs = llm.generate([[3, 4]] * 4, GREEDY, use_tqdm=False)
    ids = [o.request_id for o in outs]
    assert len(set(ids)) == 4 and not set(ids) & set(mine)
    finished = []
    while llm.has_unfinished_requests():
        finished += llm.step()
    assert sorted(o.request_id for o in finished) == mine


def test_a_failing_generate_queues_nothing(checkpoint_dir, monkeypatch):
    llm = LLM(checkpoint_dir)
    add, calls = llm.engine.add_request, [0]

    def fails_on_the_third(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return add(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "add_request", fails_on_the_third)
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate([[1, 2]] * 5, GREEDY, use_tqdm=False)
    assert not llm.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0
    assert len(llm.generate([[1, 2]] * 5, GREEDY, use_tqdm=False)) == 5


def _python_calls(run) -> int:
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def test_work_per_sample_does_not_grow_with_n(checkpoint_dir):
    """Large n is how best-of-N and RL sampling run: the Python work of a request must
    grow linearly in n (counted in function calls, not timed)."""
    llm = LLM(checkpoint_dir, max_num_seqs=512)

    def calls_for(n):
        return _python_calls(lambda: llm.generate([1, 2, 3], SamplingParams(n=n, max_tokens=2), use_tqdm=False))

    calls_for(8)  # warm-up: first-use imports and caches
    small, large = calls_for(200), calls_for(800)
    assert large < 4.5 * small, (small, large)


# run in a fresh process: in this one, heap freed by earlier tests would hide the growth
PLATEAU_CHECK = """
import sys
import torch
from benchmarks.soak import rss_mib
from microvllm.cpu.linear import PackedLinear, padded_rows

dtype = getattr(torch, sys.argv[1])
linear = PackedLinear(torch.nn.Linear(384, 1536, bias=False).to(dtype))
for rows in sorted({padded_rows(n) for n in range(1, 301)}):
    linear(torch.ones(rows, 384, dtype=dtype))
before = rss_mib()
for rows in range(1, 301):
    assert linear(torch.ones(rows, 384, dtype=dtype)).shape == (rows, 1536)
print(rss_mib() - before)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_linear_memory_reaches_a_plateau_over_every_row_count(dtype):
    """A server meets every token count from 1 to max_num_batched_tokens; oneDNN keeps
    a kernel per row count it sees, so the memory must stop growing once every padded
    row count has been met."""
    if not packs_linears(getattr(torch, dtype)):
        pytest.skip(f"this CPU runs {dtype} linears unpacked")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    growth = subprocess.run([sys.executable, "-c", PLATEAU_CHECK, dtype], env=env, check=True,
                            capture_output=True, text=True).stdout
    assert float(growth) < 16
