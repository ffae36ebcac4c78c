"""Greedy and seeded outputs do not depend on batching, caching, chunking or preemption."""

import pytest
from helpers import completions, make_prompts

from microvllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(64, shared_prefix=[256, 10, 20, 30])


@pytest.fixture(scope="module")
def alone(checkpoint_dir, prompts):
    llm = LLM(checkpoint_dir)
    return [completions(llm, [p])[0] for p in prompts]


def test_64_at_once_equals_one_at_a_time(checkpoint_dir, prompts, alone):
    assert completions(LLM(checkpoint_dir), prompts) == alone


def test_prefix_caching_off_changes_nothing(checkpoint_dir, prompts, alone):
    assert completions(LLM(checkpoint_dir, enable_prefix_caching=False), prompts) == alone


def test_chunked_prefill_changes_nothing(checkpoint_dir, prompts, alone):
    llm = LLM(checkpoint_dir, max_num_batched_tokens=7, block_size=4)
    assert completions(llm, prompts) == alone


def test_heavy_preemption_loses_and_changes_nothing(checkpoint_dir, prompts, alone):
    # one max_model_len sequence (64 tokens) needs 16 blocks of 4: leave room for ~1.5
    llm = LLM(checkpoint_dir, block_size=4, num_blocks=24)
    assert completions(llm, prompts) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_is_independent_of_the_batch(checkpoint_dir, prompts):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10,
                            ignore_eos=True)
    llm = LLM(checkpoint_dir)
    batched = completions(llm, prompts[:16], params)
    assert batched == [completions(llm, [p], params)[0] for p in prompts[:16]]
    assert len({tuple(c.token_ids) for c in batched}) > 1


def test_seeded_sampling_survives_preemption(checkpoint_dir, prompts):
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)
    roomy = completions(LLM(checkpoint_dir), prompts[:20], params)
    tight = LLM(checkpoint_dir, block_size=4, num_blocks=20)
    assert completions(tight, prompts[:20], params) == roomy
    assert tight.engine.scheduler.num_preemptions > 0


def test_different_seeds_give_different_samples(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    outs = llm.generate([[1, 2, 3]] * 8, [SamplingParams(seed=s, max_tokens=8, ignore_eos=True)
                                          for s in range(8)], use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 4
