"""Beam search finds the brute-force reference's beams, shares KV blocks, and batches."""

import pytest
import torch

from benchmarks.random_checkpoint import save_checkpoint
from checkpoints import byte_tokenizer, load_reference
from helpers import GREEDY, Completion, completions, with_decode_graphs
from microvllm import LLM, BeamSearchParams, SamplingParams
from microvllm.engine.block_manager import BlockManager
from microvllm.engine.kv_cache import PagedKVCache
from microvllm.engine.sequence import Request, Sequence
from reference import reference_beam_search

PROMPTS = [[256, 10, 20, 30], [256] + list(range(40, 57)), [256, 7]]  # 4, 18 and 2 tokens


def beams(output):
    return [(s.tokens, s.cum_logprob) for s in output.sequences]


def assert_same_beams(got, want):
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    assert [cum for _, cum in got] == pytest.approx([cum for _, cum in want], abs=1e-4)


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir)


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory, checkpoint_dir):
    """The default checkpoint with <|assistant_end|> made likely enough to end some beams."""
    sd, cfg = load_reference(checkpoint_dir)
    eos = byte_tokenizer().encode_single_token("<|assistant_end|>")
    # half the output weights of a token this model often picks: EOS then ranks high
    # in some beams' candidates, and wins in some of them
    sd["lm_head.weight"][eos] = 0.5 * sd["lm_head.weight"][55]
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "eos", 100, cfg, sd, byte_tokenizer())


def test_width_one_is_greedy(llm):
    params = BeamSearchParams(beam_width=1, max_tokens=12, ignore_eos=True)
    for prompt, out, greedy in zip(PROMPTS, llm.beam_search(PROMPTS, params), completions(llm, PROMPTS)):
        (beam,) = out.sequences
        assert beam.tokens == prompt + greedy.token_ids
        assert beam.cum_logprob == pytest.approx(sum(greedy.logprobs), abs=1e-4)
        assert beam.finish_reason == "length"


@pytest.mark.parametrize("width", [2, 4])
def test_beams_match_brute_force_search(llm, checkpoint_dir, width):
    sd, cfg = load_reference(checkpoint_dir)
    outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        assert len(out.sequences) == width
        assert_same_beams(beams(out), reference_beam_search(sd, cfg, "E", prompt, width, 10))
    assert llm.engine.block_manager.num_used_blocks == 0  # every beam gave its blocks back


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_eos_finishes_some_beams_early(eos_checkpoint, length_penalty):
    sd, cfg = load_reference(eos_checkpoint)
    llm = LLM(eos_checkpoint)
    eos_ids = llm.tokenizer.eos_token_ids
    params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=length_penalty)
    outputs = llm.beam_search(PROMPTS, params)
    reasons = [s.finish_reason for out in outputs for s in out.sequences]
    assert "stop" in reasons and "length" in reasons
    for prompt, out in zip(PROMPTS, outputs):
        want = reference_beam_search(sd, cfg, "E", prompt, 4, 10, eos_ids, length_penalty)
        assert_same_beams(beams(out), want)
        for s in out.sequences:
            assert (s.tokens[-1] in eos_ids) == (s.finish_reason == "stop")
            assert s.finish_reason == "stop" or len(s.tokens) == len(prompt) + 10
            assert s.text == llm.tokenizer.decode(s.tokens, skip_special_tokens=False)


@pytest.mark.parametrize("tight_settings", [
    dict(block_size=4, num_blocks=18),      # 72 tokens of KV for 12 beams: preemptions
    dict(max_num_batched_tokens=8),         # steps too small for all beams at once
])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_beams_do_not_depend_on_preemption_or_step_size(checkpoint_dir, tight_settings, temperature):
    params = BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True, temperature=temperature)
    roomy = LLM(checkpoint_dir, seed=3).beam_search(PROMPTS, params)
    tight = LLM(checkpoint_dir, seed=3, **tight_settings)
    outputs = tight.beam_search(PROMPTS, params)
    if "num_blocks" in tight_settings:
        assert tight.engine.scheduler.num_preemptions > 0
    for got, want in zip(outputs, roomy):
        assert_same_beams(beams(got), beams(want))
        # the candidates too, with the sampled ones when temperature > 0
        assert [[list(c) for c in s.logprobs] for s in got.sequences] == \
            [[list(c) for c in s.logprobs] for s in want.sequences]
    assert tight.engine.block_manager.num_used_blocks == 0


def test_beams_through_decode_graphs_with_few_sequence_slots(checkpoint_dir, llm):
    params = BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True)
    graphed = LLM(checkpoint_dir, max_num_seqs=6)  # fewer slots than the 12 beams
    capture = with_decode_graphs(graphed)
    for got, want in zip(graphed.beam_search(PROMPTS, params), llm.beam_search(PROMPTS, params)):
        assert_same_beams(beams(got), beams(want))
    assert capture.replays and max(capture.replays) <= 6


def test_beams_share_batches_with_other_requests(llm):
    others = [[256, 99, 98], [256, 3, 1, 4, 1, 5]]
    alone = completions(llm, others)
    ids = [llm.add_request(p, GREEDY) for p in others]
    params = BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True)
    before = llm.engine.stats.steps
    want = llm.beam_search(PROMPTS, params)
    assert llm.engine.stats.steps - before == 10  # the other requests took no steps of their own
    finished = {}
    while llm.has_unfinished_requests():
        finished.update((out.request_id, out) for out in llm.step())
    assert [Completion(finished[i].outputs[0]) for i in ids] == alone
    for got, again in zip(want, llm.beam_search(PROMPTS, params)):
        assert_same_beams(beams(got), beams(again))


def test_beams_of_a_long_prompt_share_its_blocks(make_checkpoint):
    directory = make_checkpoint(seq_len=256)
    prompt = [256] + [(7 * i + 3) % 256 for i in range(199)]  # 200 tokens: 12.5 blocks of 16
    one = LLM(directory, block_size=16)
    one.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    four = LLM(directory, block_size=16)
    four.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=16, ignore_eos=True))
    # the prompt's 12 full blocks are held once; each beam owns little more than its tail
    assert four.engine.stats.peak_used_blocks <= 1.3 * one.engine.stats.peak_used_blocks


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    manager = BlockManager(num_blocks=8, block_size=4)
    request = Request("0", None, list(range(10)), SamplingParams())
    parent, child = (Sequence(i, request, i, list(range(10)), seed=0) for i in range(2))
    manager.allocate(parent, [], 10)
    parent.num_computed_tokens = 10  # blocks 0, 1 full; block 2 holds two tokens
    source, destination = manager.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2]
    assert (source, destination) == (parent.block_table[2], child.block_table[2]) and source != destination
    assert child.num_computed_tokens == 10
    manager.check_invariants([parent.block_table, child.block_table])
    assert [manager.blocks[b].ref_count for b in parent.block_table] == [2, 2, 1]

    cache = PagedKVCache(2, 8, 4, 1, 2, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()
    cache.copy_blocks([source], [destination])
    assert torch.equal(cache.k[:, destination], cache.k[:, source])
    assert torch.equal(cache.v[:, destination], cache.v[:, source])

    full = Sequence(2, request, 2, list(range(10)), seed=0)
    parent.num_computed_tokens = 8  # a boundary: nothing to copy
    assert manager.fork(parent, full) is None and full.block_table == parent.block_table[:2]
    manager.free(parent), manager.free(child), manager.free(full)
    manager.check_invariants([])


@pytest.mark.parametrize("name, value, error", [
    ("beam_width", 0, ValueError), ("beam_width", 11, ValueError), ("beam_width", "2", TypeError),
    ("max_tokens", 0, ValueError), ("ignore_eos", "no", TypeError), ("temperature", -1, ValueError),
    ("length_penalty", float("nan"), ValueError),
])
def test_bad_beam_search_params_are_refused(name, value, error):
    with pytest.raises(error, match=name):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, name: value})


def test_a_bad_prompt_queues_nothing(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.beam_search([[256, 1], [256, 9999]], params)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([[256, 1]], SamplingParams())
    assert not llm.has_unfinished_requests()
    assert len(llm.beam_search([[256, 1]], params)[0].sequences) == 2
