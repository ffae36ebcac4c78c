"""Aborts, interrupts, preemption storms and numerical safety."""

import random

import pytest
import torch

from microvllm import LLM, SamplingParams

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

    def interrupted(scheduled):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return execute(scheduled)

    monkeypatch.setattr(llm.engine.runner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[i, i + 1] for i in range(20)], GREEDY, use_tqdm=False)
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.has_unfinished_requests()
    assert llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_preemption_storm_300_requests_through_a_cache_for_4(checkpoint_dir):
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(4, 40))] for _ in range(300)]
    roomy = LLM(checkpoint_dir)
    alone = [roomy.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    # 4 sequences of max_model_len=64 tokens in blocks of 8
    tight = LLM(checkpoint_dir, block_size=8, num_blocks=32)
    outs = tight.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert tight.engine.stats.preemptions > 0
    assert tight.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_long_context_gives_finite_logprobs(checkpoint_dir, dtype):
    llm = LLM(checkpoint_dir, dtype=dtype)
    prompt = [random.Random(0).randrange(256) for _ in range(56)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=7, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert all(torch.isfinite(torch.tensor(e[t].logprob)) for e, t in zip(out.logprobs, out.token_ids))


def test_float16_overflow_is_explained(checkpoint_dir):
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
