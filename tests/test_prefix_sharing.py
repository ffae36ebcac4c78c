"""Prompt blocks are shared: across requests with a common prefix, and by the n samples."""

from microvllm import LLM, SamplingParams


def run_until_idle(llm):
    outputs, peak_used = [], 0
    while llm.has_unfinished_requests():
        outputs += llm.step()
        peak_used = max(peak_used, llm.engine.block_manager.num_used_blocks)
    return outputs, peak_used


def test_shared_prefix_is_served_from_the_cache(checkpoint_dir):
    system = [256] + list(range(40, 88))  # 49 tokens: three full blocks of 16
    prompts = [system + [i, i + 1] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def peak_and_outputs(caching):
        llm = LLM(checkpoint_dir, enable_prefix_caching=caching)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm the cache with the prefix
        for p in prompts[1:]:
            llm.add_request(p, params)
        return run_until_idle(llm)

    cached_outputs, cached_peak = peak_and_outputs(True)
    plain_outputs, plain_peak = peak_and_outputs(False)
    assert all(o.num_cached_tokens == 48 for o in cached_outputs)
    assert all(o.num_cached_tokens == 0 for o in plain_outputs)
    assert cached_peak < plain_peak
    by_id = lambda outs: sorted(o.outputs[0].token_ids for o in outs)
    assert by_id(cached_outputs) == by_id(plain_outputs)


def test_a_fully_cached_prompt_still_computes_its_last_token(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    prompt = list(range(32))  # exactly two blocks
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_n_samples_share_their_prompt_blocks(checkpoint_dir):
    for caching in (True, False):
        llm = LLM(checkpoint_dir, enable_prefix_caching=caching)
        prompt = list(range(50))  # 3 full blocks + 2 tokens
        llm.add_request(prompt, SamplingParams(n=4, max_tokens=6, seed=0, ignore_eos=True))
        engine = llm.engine
        while any(s.num_output_tokens == 0 for s in engine.scheduler.waiting) or len(engine.scheduler.running) < 4:
            llm.step()
        # 4 separate copies would need 4 * 4 blocks; sharing the 3 full ones needs 3 + 4
        assert engine.block_manager.num_used_blocks == 3 + 4
        (out,) = run_until_idle(llm)[0]
        assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1
        assert engine.block_manager.num_used_blocks == 0


def test_cached_blocks_outlive_their_request_and_are_evicted_lru(checkpoint_dir):
    llm = LLM(checkpoint_dir, block_size=4, num_blocks=20)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([list(range(17))], params, use_tqdm=False)
    assert llm.generate([list(range(17))], params, use_tqdm=False)[0].num_cached_tokens == 16
    for start in range(100, 200, 20):  # other prompts evict the oldest cached blocks
        llm.generate([list(range(start, start + 17))], params, use_tqdm=False)
    assert llm.generate([list(range(17))], params, use_tqdm=False)[0].num_cached_tokens < 16
