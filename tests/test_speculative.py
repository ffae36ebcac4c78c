"""Speculative decoding: guesses checked in the step change when tokens come, never which.

Every request is run twice, without and with speculation, and the outputs must match
token for token (log-probs to float tolerance). Three proposers guess: the real n-gram
one on prompts that repeat themselves, an oracle that knows the output without
speculation (every guess right), and one that is always wrong.
"""

import json

import pytest
import torch

from helpers import make_prompts, tool_call, varied_lengths, with_decode_graphs, writing

from microvllm import LLM, SamplingParams
from microvllm.serve.cli import build_parser
from microvllm.serve.metrics import prometheus_text
from microvllm.speculative.config import SpeculativeConfig, parse_speculative_config
from microvllm.speculative.ngram import NgramIndex
from microvllm.speculative.proposer import Proposer

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# prompts that repeat themselves, so that prompt lookup has something to find
REPEATING = [[1, 2, 3, 4, 5, 1, 2, 3], [9, 8, 7, 9, 8, 7, 9], [40, 41, 42, 43, 44, 45, 40, 41, 42],
             [5] * 6, [100, 7, 100, 7, 100]]


class Reference:
    """The outputs without speculation, by (prompt, sample index)."""

    def __init__(self, prompts, outputs):
        self.tokens = {(tuple(p), c.index): c.token_ids for p, o in zip(prompts, outputs) for c in o.outputs}

    def next_tokens(self, seq, num: int) -> list[int]:
        want = self.tokens.get((tuple(seq.token_ids[:seq.num_prompt_tokens]), seq.index), [])
        done = seq.output_token_ids
        return list(want[len(done):len(done) + num]) if want[:len(done)] == done else []


class OracleProposer(Proposer):
    """Guesses what the run without speculation emitted: every guess is right."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self.asked: list[int] = []

    def propose(self, seqs, num_guesses):
        self.asked += num_guesses
        return [self.reference.next_tokens(seq, num) for seq, num in zip(seqs, num_guesses)]


class WrongProposer(OracleProposer):
    """Guesses a token next to the right one: every first guess is wrong."""

    def propose(self, seqs, num_guesses):
        return [[(t + 1) % 256 for t in guesses] for guesses in super().propose(seqs, num_guesses)]


PROPOSERS = ["ngram", "oracle", "wrong"]


def spec_llm(checkpoint, proposer: str, reference: Reference, **kwargs) -> LLM:
    llm = LLM(checkpoint, speculative_config=NGRAM, **kwargs)
    if proposer != "ngram":
        llm.engine.speculator.proposer = (OracleProposer if proposer == "oracle" else WrongProposer)(reference)
    return llm


def assert_same_outputs(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            assert a.token_ids == b.token_ids
            assert (a.text, a.finish_reason, a.stop_reason, a.token_masks) == \
                (b.text, b.finish_reason, b.stop_reason, b.token_masks)
            assert (a.logprobs is None) == (b.logprobs is None)
            if b.logprobs is not None:
                for x, y in zip(a.logprobs, b.logprobs):
                    assert (x is None) == (y is None)
                    if y is not None:
                        assert set(x) == set(y)
                        assert [x[t].logprob for t in y] == pytest.approx([y[t].logprob for t in y], abs=1e-4)
                assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)


def check_both_ways(checkpoint, proposer, prompts, params, **kwargs) -> LLM:
    """Runs `prompts` without and with speculation, asserts equal outputs; returns the
    speculative LLM."""
    want = LLM(checkpoint, **kwargs).generate(prompts, params, use_tqdm=False)
    llm = spec_llm(checkpoint, proposer, Reference(prompts, want), **kwargs)
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)
    return llm


# -- the same outputs ----------------------------------------------------------------

@pytest.mark.parametrize("proposer", PROPOSERS)
def test_greedy_outputs_and_logprobs_are_unchanged(checkpoint_dir, proposer):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0)
    llm = check_both_ways(checkpoint_dir, proposer, REPEATING, params)
    assert llm.engine.stats.spec_decode_num_drafts > 0


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_bfloat16_outputs_are_unchanged(checkpoint_dir, proposer):
    # a guessed row attends as a decode of its own, so even bfloat16 rounds it as a plain step does
    prompts = REPEATING + make_prompts(11, seed=8)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0)
    check_both_ways(checkpoint_dir, proposer, prompts, params, dtype="bfloat16")


def test_guessed_decode_steps_replay_decode_graphs(checkpoint_dir):
    prompts = REPEATING
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0)
    plain = LLM(checkpoint_dir, max_num_seqs=32)
    with_decode_graphs(plain)
    want = plain.generate(prompts, params, use_tqdm=False)
    llm = spec_llm(checkpoint_dir, "oracle", Reference(prompts, want), max_num_seqs=32)
    capture = with_decode_graphs(llm)
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)
    # 5 sequences with up to 4 guesses each: more rows than sequences, within the 32 captured
    assert max(capture.replays) > len(prompts)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_seeded_sampling_is_unchanged(checkpoint_dir, proposer):
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=25, ignore_eos=True, logprobs=1, **extra)
              for s, extra in enumerate([{}, dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2),
                                         dict(top_k=20, top_p=0.9, min_p=0.05)])]
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_penalties_see_the_guessed_tokens_before_them(checkpoint_dir, proposer):
    params = [SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, **extra)
              for extra in [dict(repetition_penalty=1.3), dict(presence_penalty=0.8), dict(frequency_penalty=0.5),
                            dict(repetition_penalty=0.8, frequency_penalty=-0.3), dict(presence_penalty=-0.5)]]
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_stop_token_ids_and_min_tokens_are_unchanged(checkpoint_dir, proposer):
    want = LLM(checkpoint_dir).generate(REPEATING, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                        use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[o.outputs[0].token_ids[5]],
                             min_tokens=min_tokens)
              for o, min_tokens in zip(want, [0, 3, 8, 0, 12])]
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_stop_strings_are_unchanged(checkpoint_dir, proposer):
    plain = LLM(checkpoint_dir)
    texts = [o.outputs[0].text for o in plain.generate(
        REPEATING, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[text[6:9] or "x"],
                             min_tokens=min_tokens, include_stop_str_in_output=bool(i % 2))
              for i, (text, min_tokens) in enumerate(zip(texts, [0, 0, 5, 2, 9]))]
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_max_tokens_and_max_model_len_are_never_passed(checkpoint_dir, proposer):
    prompts = REPEATING * 4
    check_both_ways(checkpoint_dir, proposer, prompts, varied_lengths(len(prompts)))
    check_both_ways(checkpoint_dir, proposer, [p * 4 for p in REPEATING],
                    SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), max_model_len=48)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_n_samples_are_unchanged(checkpoint_dir, proposer):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=20, ignore_eos=True, logprobs=0)
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_many_prompts_with_prefix_caching_are_unchanged(checkpoint_dir, proposer):
    prompts = make_prompts(24, seed=3, shared_prefix=[3, 1, 4, 1, 5, 9, 2, 6] * 3)
    check_both_ways(checkpoint_dir, proposer, prompts * 2, varied_lengths(48, seed=2), block_size=4)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_chunked_prefill_is_unchanged(checkpoint_dir, proposer):
    prompts = make_prompts(12, seed=5) + REPEATING
    check_both_ways(checkpoint_dir, proposer, prompts, varied_lengths(len(prompts), seed=5),
                    max_num_batched_tokens=16, block_size=4)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_preemption_is_unchanged(checkpoint_dir, proposer):
    prompts = make_prompts(10, seed=9) + REPEATING
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    llm = check_both_ways(checkpoint_dir, proposer, prompts, params, num_blocks=24, block_size=4)
    assert llm.engine.stats.preemptions > 0


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_logits_shaping_sees_the_guessed_tokens_before_them(checkpoint_dir, proposer):
    def no_repeats(output_ids, logits):  # a processor whose mask depends on every earlier output
        if output_ids:
            logits = logits.clone()
            logits[torch.tensor(output_ids[-3:])] = float("-inf")
        return logits

    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logits_processors=[no_repeats]),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, allowed_token_ids=list(range(3, 60))),
              SamplingParams(temperature=0.9, seed=1, max_tokens=20, ignore_eos=True, bad_words=["a", "b c"]),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                             logits_processors=[lambda prompt_ids, output_ids, logits: logits * (1 + len(output_ids) % 3)]),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_top_logprobs_are_unchanged(checkpoint_dir, proposer):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    check_both_ways(checkpoint_dir, proposer, REPEATING, params)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_tool_calls_are_unchanged(checkpoint_dir, proposer):
    tokenizer = LLM(checkpoint_dir).tokenizer
    script = tool_call(tokenizer, "6*7")
    params = SamplingParams(temperature=0, max_tokens=len(script) + 12, ignore_eos=True, logprobs=0,
                            logits_processors=[writing(script)])
    check_both_ways(checkpoint_dir, proposer, REPEATING, params, block_size=16)


# -- blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("proposer", PROPOSERS)
def test_rejected_guesses_leave_no_blocks_behind(checkpoint_dir, proposer):
    prompts = make_prompts(8, seed=1) + REPEATING
    params = varied_lengths(len(prompts), seed=4)
    kwargs = dict(num_blocks=40, block_size=4)
    plain = LLM(checkpoint_dir, **kwargs)
    want = plain.generate(prompts, params, use_tqdm=False)
    llm = spec_llm(checkpoint_dir, proposer, Reference(prompts, want), **kwargs)
    engine = llm.engine
    for prompt, p in zip(prompts, params):
        engine.add_request(None, prompt, p)
    while engine.has_unfinished_requests():
        engine.step()
        # between steps every sequence holds the blocks its computed tokens need, no more
        running = engine.scheduler.running
        engine.block_manager.check_invariants([seq.block_table for seq in running])
        for seq in running:
            assert len(seq.block_table) == engine.block_manager.blocks_needed(seq.num_computed_tokens)
    assert engine.block_manager.num_free_blocks == plain.engine.block_manager.num_free_blocks == 40
    assert not engine.speculator.paces or all(s.is_finished for s in engine.speculator.paces)


def test_only_computed_accepted_tokens_are_cached(checkpoint_dir):
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = LLM(checkpoint_dir, block_size=4).generate([prompt], params, use_tqdm=False)
    llm = spec_llm(checkpoint_dir, "wrong", Reference([prompt], want), block_size=4)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    tokens = prompt + out.token_ids
    cached = {block.token_ids for block in llm.engine.block_manager.blocks if block.hash is not None}
    # every cached block holds tokens the sequence really has, block-aligned
    assert cached and all(tuple(tokens[i:i + 4]) in cached for i in range(0, 4 * len(cached), 4))
    assert len(cached) <= (len(tokens) - 1) // 4


# -- counters and pacing --------------------------------------------------------------

def test_oracle_guesses_are_all_accepted(checkpoint_dir):
    params = SamplingParams(temperature=0.7, seed=2, max_tokens=30, ignore_eos=True)
    llm = check_both_ways(checkpoint_dir, "oracle", REPEATING, params)
    stats = llm.engine.stats
    assert stats.acceptance_rate == 1.0 and stats.spec_decode_num_draft_tokens > 0
    assert stats.mean_accepted_length > 2
    assert stats.generated_tokens == 30 * len(REPEATING)
    assert stats.steps < 30  # fewer steps than tokens per request


def test_wrong_guesses_are_never_accepted_and_back_off(checkpoint_dir):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = check_both_ways(checkpoint_dir, "wrong", REPEATING, params)
    stats = llm.engine.stats
    assert stats.acceptance_rate == 0.0 and stats.spec_decode_num_drafts > 0
    assert stats.mean_accepted_length == 1.0
    assert stats.generated_tokens == 40 * len(REPEATING)
    # 4 guesses a step at first; after misses, ever rarer single guesses
    assert stats.spec_decode_num_draft_tokens < 0.25 * 4 * 39 * len(REPEATING)
    assert max(llm.engine.speculator.proposer.asked[len(REPEATING):]) == 1


def test_ngram_guesses_are_accepted_on_text_that_repeats(checkpoint_dir):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    stats = check_both_ways(checkpoint_dir, "ngram", REPEATING, params).engine.stats
    assert stats.acceptance_rate > 0.5 and stats.mean_accepted_length > 1.5


def test_guesses_stay_within_the_step_token_budget(checkpoint_dir):
    prompts = REPEATING * 3
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = LLM(checkpoint_dir).generate(prompts, params, use_tqdm=False)
    llm = spec_llm(checkpoint_dir, "oracle", Reference(prompts, want), max_num_batched_tokens=20)
    proposer = llm.engine.speculator.proposer
    runner = llm.engine.runner
    execute = runner.execute
    step_sizes = []

    def counting(scheduled, guessing=False):
        step_sizes.append(sum(s.num_new_tokens + len(s.guesses) for s in scheduled))
        return execute(scheduled, guessing)

    runner.execute = counting
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)
    assert max(step_sizes) <= 20 and proposer.asked


# -- configuration ---------------------------------------------------------------------

def lookup(tokens, min_n, max_n, num_guesses):
    return NgramIndex(min_n, max_n).guesses(tokens, num_guesses)


def test_ngram_lookup_follows_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 2, 3, 8, 7, 2, 3], 1, 3, 2) == [8, 7]  # "2 3" last seen before "8 7"
    assert lookup([5, 6, 1, 2, 3, 7, 2, 3], 2, 3, 3) == [7, 2, 3]
    assert lookup([1, 9, 3, 4, 2, 3, 4], 2, 3, 2) == [2, 3]  # "3 4" after "9": the 3-gram "2 3 4" is new
    assert lookup([1, 2, 3, 4], 1, 3, 4) == []
    assert lookup([4, 1, 2, 3, 9, 2, 3], 3, 3, 2) == []  # "9 2 3" never occurred before
    assert lookup([7, 7], 1, 3, 3) == [7]


def test_ngram_index_grows_with_the_sequence():
    index, tokens = NgramIndex(1, 2), [1, 2, 3]
    assert index.guesses(tokens, 2) == []
    tokens += [1, 2]
    assert index.guesses(tokens, 2) == [3, 1]
    tokens += [3, 1, 2]  # guesses accepted: the index takes in the tokens it has not seen
    assert index.guesses(tokens, 3) == [3, 1, 2]
    tokens += [5]
    assert index.guesses(tokens, 3) == []


def test_vllm_defaults_for_prompt_lookup():
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3}) == \
        SpeculativeConfig("ngram", 3, 5, 5)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}) == \
        SpeculativeConfig("ngram", 3, 4, 4)
    assert parse_speculative_config({"model": "/d", "num_speculative_tokens": 2}) == \
        SpeculativeConfig("draft_model", 2, model="/d")
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize("config, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, r"speculative_config.num_speculative_tokens=0: must be an int in \[1, 16\]"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens=None"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens=17"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min=4 must be <= speculative_config.prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min=0"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method='eagle' is not supported"),
    ({"method": "nope", "num_speculative_tokens": 2}, "method='nope'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "'draft_tensor_parallel_size'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "/d"}, "speculative_config.model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model=None"),
])
def test_bad_speculative_configs_are_refused_by_name(checkpoint_dir, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(checkpoint_dir, speculative_config=config)


def test_beam_search_refuses_a_speculative_engine(checkpoint_dir):
    from microvllm import BeamSearchParams
    llm = LLM(checkpoint_dir, speculative_config=NGRAM)
    with pytest.raises(ValueError, match="speculative_config"):
        llm.beam_search([{"prompt_token_ids": [1, 2, 3]}], BeamSearchParams(beam_width=2, max_tokens=4))


def test_server_flag_takes_json(checkpoint_dir):
    args = build_parser().parse_args([str(checkpoint_dir), "--speculative-config", json.dumps(NGRAM)])
    assert args.speculative_config == NGRAM
    with pytest.raises(SystemExit):
        build_parser().parse_args([str(checkpoint_dir), "--speculative-config", "{method: ngram"])


def test_metrics_show_the_speculative_counters(checkpoint_dir):
    llm = LLM(checkpoint_dir, speculative_config=NGRAM)
    llm.generate(REPEATING, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)

    class Served:  # what prometheus_text reads of the server's engine
        stats = llm.engine.stats
        num_aborted_requests = num_refused_calls = 0

        def tokens_per_second(self):
            return 0.0

    text = prometheus_text(Served())
    stats = llm.engine.stats
    assert f"microvllm_spec_decode_num_drafts_total {stats.spec_decode_num_drafts}" in text
    assert f"microvllm_spec_decode_num_draft_tokens_total {stats.spec_decode_num_draft_tokens}" in text
    assert f"microvllm_spec_decode_num_accepted_tokens_total {stats.spec_decode_num_accepted_tokens}" in text
