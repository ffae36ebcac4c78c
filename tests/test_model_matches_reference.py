"""Every era's greedy tokens and log-probs equal a plain full-recompute forward."""

import pytest
import torch

from checkpoints import load_reference
from microvllm import LLM, SamplingParams
from microvllm.cpu.linear import PackedLinear, packs_linears
from reference import reference_greedy, reference_logits

# D and E only slide their short windows beyond 128 tokens, so they get a longer context
ERA_SHAPES = {"A": dict(seq_len=64), "B": dict(seq_len=64), "C": dict(seq_len=64),
              "D": dict(seq_len=256), "E": dict(seq_len=256)}


@pytest.mark.parametrize("era", sorted(ERA_SHAPES))
def test_greedy_tokens_and_logprobs_match_full_recompute(make_checkpoint, era):
    directory = make_checkpoint(era=era, window_pattern=None if era == "A" else "SSL",
                                **ERA_SHAPES[era])
    sd, cfg = load_reference(directory)
    prompt_len = 40 if cfg["sequence_len"] == 64 else 140  # long enough for windows to slide
    prompt = [(7 * i + 3) % 256 for i in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True)
    llm = LLM(directory, block_size=16, max_num_batched_tokens=64)  # chunked prefill too
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    want_tokens, want_logprobs = reference_greedy(sd, cfg, era, prompt, 10)
    assert out.token_ids == want_tokens
    got_logprobs = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)]
    assert got_logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(want_logprobs), abs=1e-3)


@pytest.mark.skipif(not packs_linears(torch.float32), reason="torch is built without oneDNN")
def test_packed_float32_engine_serves_the_reference_tokens_alone_and_in_a_batch(checkpoint_dir):
    sd, cfg = load_reference(checkpoint_dir)
    prompts = [[(7 * i + 3 * k + 1) % 256 for i in range(5 + 3 * k)] for k in range(12)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(checkpoint_dir, dtype="float32")
    assert isinstance(llm.engine.model.lm_head, PackedLinear)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone == [reference_greedy(sd, cfg, "E", p, 8)[0] for p in prompts]


def test_prompt_logprobs_match_full_recompute(checkpoint_dir):
    sd, cfg = load_reference(checkpoint_dir)
    prompt = [256] + [(5 * i + 1) % 256 for i in range(30)]
    llm = LLM(checkpoint_dir, max_num_batched_tokens=8)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    want = reference_logits(sd, cfg, "E", prompt).log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(float(want[pos - 1, prompt[pos]]), abs=1e-4)
        top = want[pos - 1].topk(3)
        for rank, (token, logprob) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[token].logprob == pytest.approx(logprob, abs=1e-4)
            assert entry[token].rank == rank


def test_compiled_checkpoint_prefix_is_stripped(make_checkpoint):
    directory = make_checkpoint(compiled_prefix=True)
    out = LLM(directory).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


@pytest.mark.parametrize("era", ["A", "E"])
def test_bfloat16_logprobs_stay_within_bfloat16_tolerance_of_the_float32_reference(make_checkpoint, era):
    # teacher-forced on the engine's own tokens, so a near-tie that bf16 breaks the other
    # way does not send the comparison down another path
    directory = make_checkpoint(era=era, window_pattern=None if era == "A" else "SSL", **ERA_SHAPES[era])
    sd, cfg = load_reference(directory)
    prompt = [(7 * i + 3) % 256 for i in range(40 if era == "A" else 140)]
    llm = LLM(directory, dtype="bfloat16", block_size=16, max_num_batched_tokens=64)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    want = reference_logits(sd, cfg, era, prompt + out.token_ids).log_softmax(-1)
    for i, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        assert entry[token].logprob == pytest.approx(float(want[len(prompt) + i - 1, token]), abs=0.05)
