"""Tool calls: a call the model writes is answered with forced tokens, masked 0, computed
as one chunk, and the greedy continuation equals a full recompute over all the tokens."""

import pytest

from checkpoints import load_reference
from helpers import tool_answer, tool_call, writing

from microvllm import LLM, RequestOutputKind, SamplingParams
from reference import reference_greedy

PROMPT = [(5 * i + 1) % 256 for i in range(20)]


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir, block_size=16)


def params_writing(script, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, logits_processors=[writing(script)], **kwargs)


def test_calculator_answer_is_forced_masked_and_the_rest_matches_full_recompute(llm, checkpoint_dir):
    script, answer = tool_call(llm.tokenizer, "1,200 * 3"), tool_answer(llm.tokenizer, "3600")
    out = llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + len(answer) + 6, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:len(script) + len(answer)] == script + answer
    assert out.token_masks == [1] * len(script) + [0] * len(answer) + [1] * 6
    sd, cfg = load_reference(checkpoint_dir)
    want, want_logprobs = reference_greedy(sd, cfg, "E", PROMPT + script + answer, 6)
    assert out.token_ids[len(script) + len(answer):] == want
    got_logprobs = [entry[t].logprob for entry, t in zip(out.logprobs[-6:], want)]
    assert got_logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert out.logprobs[len(script):len(script) + len(answer)] == [None] * len(answer)


def test_forced_tokens_are_computed_in_one_step(llm):
    script, answer = tool_call(llm.tokenizer, "2+2"), tool_answer(llm.tokenizer, "4")
    steps_before = llm.engine.stats.steps
    llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + len(answer) + 1), use_tqdm=False)
    # the prefill, one step per scripted token, then one for the whole answer
    assert llm.engine.stats.steps - steps_before == 1 + len(script)


def test_forced_tokens_count_toward_max_tokens(llm):
    script = tool_call(llm.tokenizer, "6*7")
    out = llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + 2), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == script + tool_answer(llm.tokenizer, "42")[:2]
    assert out.token_masks == [1] * len(script) + [0, 0]
    assert out.finish_reason == "length"


def test_no_answer_forces_nothing(llm):
    script = tool_call(llm.tokenizer, "__import__('os')")
    out = llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + 3), use_tqdm=False)[0].outputs[0]
    assert out.token_masks == [1] * (len(script) + 3)


def test_tools_none_turns_tool_calls_off(llm):
    script = tool_call(llm.tokenizer, "1+1")
    out = llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + 3, tools=None),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_masks == [1] * (len(script) + 3)


def test_a_callers_tool_answers_with_its_text(llm):
    script = tool_call(llm.tokenizer, "abc")
    tool = lambda expression: expression.upper() + "!"
    out = llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + 8, tools=tool),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[len(script):len(script) + 6] == tool_answer(llm.tokenizer, "ABC!")


def test_stop_strings_see_the_forced_text(llm):
    script = tool_call(llm.tokenizer, "7*11")
    out = llm.generate([PROMPT], params_writing(script, max_tokens=30, stop="77"), use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", "77")
    assert out.text == "7*11"


def test_tool_calls_survive_preemption_chunking_and_samples(checkpoint_dir, llm):
    script = tool_call(llm.tokenizer, "12+30")
    params = params_writing(script, max_tokens=30, n=2)
    prompts = [PROMPT[:k] + [k] for k in range(8, 20)]
    roomy = llm.generate(prompts, params, use_tqdm=False)
    tight = LLM(checkpoint_dir, block_size=16, num_blocks=12, max_num_batched_tokens=24)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats.preemptions > 0
    for a, b in zip(roomy, outs):
        assert [(c.token_ids, c.token_masks) for c in a.outputs] == [(c.token_ids, c.token_masks) for c in b.outputs]
        assert a.outputs[0].token_ids[len(script):len(script) + 4] == tool_answer(llm.tokenizer, "42")


def test_delta_stream_adds_up_to_the_final_output(llm):
    script = tool_call(llm.tokenizer, "9*9")
    params = params_writing(script, max_tokens=len(script) + 8, output_kind=RequestOutputKind.DELTA)
    llm.add_request(PROMPT, params, request_id="stream")
    tokens, masks, text = [], [], ""
    while llm.has_unfinished_requests():
        for out in llm.step():
            tokens += out.outputs[0].token_ids
            masks += out.outputs[0].token_masks
            text += out.outputs[0].text
    final = llm.generate([PROMPT], params_writing(script, max_tokens=len(script) + 8), use_tqdm=False)[0].outputs[0]
    assert (tokens, masks, text) == (final.token_ids, final.token_masks, final.text)
