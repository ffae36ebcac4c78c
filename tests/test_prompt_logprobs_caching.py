"""Scoring requests share work: prompt log-probs ride along with cached prefix blocks,
prompts with a common context admitted together compute it once, and positions whose
log-probs are not asked for get no logits."""

import pytest

from microvllm import LLM, SamplingParams

CONTEXT = [256] + [(7 * i + 3) % 256 for i in range(44)]   # 45 tokens: two full blocks of 16
CHOICES = [[11, 12, 13], [40, 41, 42, 43, 44], [99], [7, 8, 9, 10]]
PROMPTS = [CONTEXT + choice for choice in CHOICES]


def scored(llm, prompts, k, start=0):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k, prompt_logprobs_start=start)
    return llm.generate(prompts, params, use_tqdm=False)


def assert_entries_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert list(g) == list(w)  # the same tokens, in the same order
        for token in w:
            assert g[token].rank == w[token].rank
            assert g[token].decoded_token == w[token].decoded_token
            assert g[token].logprob == pytest.approx(w[token].logprob, abs=1e-5)


@pytest.fixture
def uncached(checkpoint_dir):
    return LLM(checkpoint_dir, enable_prefix_caching=False)


def test_choices_scored_in_one_call_compute_their_context_once(checkpoint_dir, uncached):
    outs = scored(LLM(checkpoint_dir), PROMPTS, k=2)
    # the first computes the context; the others wait a step and read it, log-probs included
    # (all but its last block, whose first token's entry the block before predicted)
    assert [o.num_cached_tokens for o in outs] == [0, 16, 16, 16]
    for out, want in zip(outs, scored(uncached, PROMPTS, k=2)):
        assert_entries_equal(out.prompt_logprobs, want.prompt_logprobs)


@pytest.mark.parametrize("cached_k, k, num_cached", [(5, 1, 16), (0, 3, 0)],
                         ids=["fewer top tokens are read from more", "more top tokens than cached are computed"])
def test_prompt_logprobs_reuse_entries_kept_with_at_least_as_many_top_tokens(checkpoint_dir, uncached,
                                                                              cached_k, k, num_cached):
    llm = LLM(checkpoint_dir)
    scored(llm, PROMPTS[:1], k=cached_k)
    (out,) = scored(llm, PROMPTS[1:2], k=k)
    assert out.num_cached_tokens == num_cached
    assert_entries_equal(out.prompt_logprobs, scored(uncached, PROMPTS[1:2], k=k)[0].prompt_logprobs)


def test_a_reset_prefix_cache_forgets_the_cached_prompt_logprobs(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    scored(llm, PROMPTS[:1], k=1)
    llm.reset_prefix_cache()
    assert scored(llm, PROMPTS[1:2], k=1)[0].num_cached_tokens == 0


def test_prompt_logprobs_start_leaves_earlier_entries_out(checkpoint_dir, uncached):
    start = len(CONTEXT)
    (full,) = scored(uncached, PROMPTS[1:2], k=2)
    (part,) = scored(uncached, PROMPTS[1:2], k=2, start=start)
    assert part.prompt_logprobs[:start] == [None] * start
    assert_entries_equal(part.prompt_logprobs[start:], full.prompt_logprobs[start:])


def test_prompt_logprobs_start_computes_logits_only_where_asked(checkpoint_dir, monkeypatch):
    llm = LLM(checkpoint_dir, enable_prefix_caching=False)
    model = llm.engine.runner.model
    rows = []
    compute_logits = model.compute_logits
    monkeypatch.setattr(model, "compute_logits", lambda h: rows.append(len(h)) or compute_logits(h))
    scored(llm, PROMPTS[1:2], k=0, start=len(CONTEXT))
    # the continuation's 5 positions, and the one that samples
    assert sum(rows) == len(CHOICES[1]) + 1


def test_choices_after_a_scored_context_reuse_it_whole(checkpoint_dir, uncached):
    # with the context's entries not asked for, every full context block is reused
    llm = LLM(checkpoint_dir)
    outs = scored(llm, PROMPTS, k=0, start=len(CONTEXT))
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32, 32]
    for out, want in zip(outs, scored(uncached, PROMPTS, k=0, start=len(CONTEXT))):
        assert_entries_equal(out.prompt_logprobs, want.prompt_logprobs)


def test_prompts_with_a_common_context_admitted_together_compute_it_once(checkpoint_dir, uncached):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = LLM(checkpoint_dir).generate(PROMPTS, params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32, 32]
    want = uncached.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]


def test_prompt_logprobs_start_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="prompt_logprobs_start needs prompt_logprobs"):
        SamplingParams(prompt_logprobs_start=3)
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs=1, prompt_logprobs_start=-1)


def test_many_contexts_scored_together_each_compute_once(checkpoint_dir):
    # freed blocks are reused first on the CPU: a context its later choices wait for must
    # outlast the other contexts' blocks, freed in the same step
    contexts = [[256] + [(11 * c + 5 * i) % 256 for i in range(44)] for c in range(6)]
    prompts = [context + choice for context in contexts for choice in CHOICES]
    outs = scored(LLM(checkpoint_dir), prompts, k=0, start=len(CONTEXT))
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32, 32] * len(contexts)
