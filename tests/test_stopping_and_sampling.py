"""Stop rules, token limits, penalties and the output fields users read."""

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.engine.sampler import uniform_noise
from microvllm.model.loader import find_checkpoint, read_state_dict


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir)


def greedy_tokens(llm, prompt, max_tokens=20):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(["hi"], SamplingParams(max_tokens=7, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 7
    assert out.outputs[0].finish_reason == "length" and out.finished


def test_generation_stops_at_max_model_len(checkpoint_dir):
    llm = LLM(checkpoint_dir, max_model_len=20)
    out = llm.generate([list(range(15))], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_stop_token_id_is_kept_and_reported(llm):
    tokens = greedy_tokens(llm, [1, 2, 3])
    stop = tokens[4]
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop],
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:tokens.index(stop) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_stops_unless_ignored(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    tokens = greedy_tokens(llm, [4, 5, 6])
    # make <|bos|> (an EOS for nanochat) a little likelier than the token greedy picks third
    state = read_state_dict(find_checkpoint(checkpoint_dir)[0])
    state["lm_head.weight"][llm.tokenizer.bos_id] = state["lm_head.weight"][tokens[2]] * 1.05
    llm.update_weights(state)
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == llm.tokenizer.bos_id and len(out.token_ids) <= 3
    assert out.finish_reason == "stop" and out.stop_reason is None and out.text == llm.tokenizer.decode(out.token_ids[:-1])
    ignored = greedy_tokens(llm, [4, 5, 6])
    assert len(ignored) == 20 and llm.tokenizer.bos_id in ignored


def test_min_tokens_blocks_stop_tokens(llm):
    tokens = greedy_tokens(llm, [1, 2, 3])
    stop = tokens[0]
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != stop and len(out.token_ids) >= 3
    assert stop not in out.token_ids[:2]


def test_stop_string_is_cut_from_the_text(llm):
    full = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = full[5:7]
    first = full.find(stop)
    out = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=20, stop=stop, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full[:first] and (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True,
                                                include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == full[:first + len(stop)]


def test_repetition_penalties_change_greedy_output(llm):
    prompt = [7, 7, 7, 7, 7, 7]
    plain = greedy_tokens(llm, prompt, 30)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
                            presence_penalty=2.0, repetition_penalty=2.0)
    penalised = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


def test_top_k_1_is_greedy(llm):
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True, seed=3)
    assert llm.generate([[9, 8]], params, use_tqdm=False)[0].outputs[0].token_ids == greedy_tokens(llm, [9, 8], 10)


def test_tiny_top_p_is_greedy(llm):
    params = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True)
    assert llm.generate([[9, 8]], params, use_tqdm=False)[0].outputs[0].token_ids == greedy_tokens(llm, [9, 8], 10)


def test_min_p_near_1_is_greedy(llm):
    params = SamplingParams(temperature=1.0, min_p=0.999, max_tokens=10, ignore_eos=True)
    assert llm.generate([[9, 8]], params, use_tqdm=False)[0].outputs[0].token_ids == greedy_tokens(llm, [9, 8], 10)


def test_sampling_noise_is_uniform():
    u = uniform_noise(torch.tensor([1, 2**40 + 5]), torch.tensor([0, 3]), torch.arange(50_000))
    assert 0 < u.min() and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])


def test_sampling_follows_the_distribution(llm):
    outs = llm.generate([[3, 1, 4]], SamplingParams(n=400, max_tokens=1, temperature=1.0, seed=0, logprobs=0),
                        use_tqdm=False)[0].outputs
    first_tokens = torch.tensor([c.token_ids[0] for c in outs])
    probs = {c.token_ids[0]: torch.tensor(c.logprobs[0][c.token_ids[0]].logprob).exp() for c in outs}
    top = max(probs, key=probs.get)
    observed = float((first_tokens == top).float().mean())
    assert abs(observed - float(probs[top])) < 4 * (float(probs[top]) / 400) ** 0.5 + 0.02


def test_output_fields_and_dict_access(llm):
    out = llm.generate({"prompt": "hello"}, SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2),
                       use_tqdm=False)[0]
    assert out.prompt == "hello" and out.prompt_token_ids[0] == llm.tokenizer.bos_id
    assert out["text"] == out.outputs[0].text and out["token_ids"] == out.outputs[0].token_ids
    assert all(len(entry) in (2, 3) for entry in out.outputs[0].logprobs)
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_outputs_come_back_in_input_order(llm):
    prompts = [[i] * (30 - i) for i in range(1, 20)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts


def test_chat_renders_nanochat_format(llm):
    tok = llm.tokenizer
    ids = tok.render_chat([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "2+2?"}])
    s = tok.special
    assert ids == ([tok.bos_id, s["<|user_start|>"]] + tok.encode("Be brief.\n\nHi", prepend_bos=False)
                   + [s["<|user_end|>"], s["<|assistant_start|>"]] + tok.encode("Hello", prepend_bos=False)
                   + [s["<|assistant_end|>"], s["<|user_start|>"]] + tok.encode("2+2?", prepend_bos=False)
                   + [s["<|user_end|>"], s["<|assistant_start|>"]])
    replies = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                       SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(replies) == 2


def test_special_token_text_in_prompts_stays_text(llm):
    assert llm.tokenizer.bos_id not in llm.tokenizer.encode("<|bos|>", prepend_bos=False)
