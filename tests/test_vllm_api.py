"""The vLLM-shaped surface: llm_engine's request loop and streaming, get_tokenizer,
chat prompts, vLLM-only arguments refused by name, SamplingParams' token shaping, and
the names lm-eval's vllm backend uses (TokensPrompt, model_config, its LLM defaults)."""

import logging

import pytest
import torch

import microvllm
from microvllm import LLM, RequestOutputKind, SamplingParams, TextPrompt, TokensPrompt
from microvllm.engine.config import DEFAULT_MAX_NUM_SEQS, EngineConfig

PROMPT = [1, 2, 3, 4, 5]
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir)


def greedy(llm, prompt=PROMPT, **params):
    return llm.generate([prompt], SamplingParams(**{**GREEDY, **params}), use_tqdm=False)[0]


def drain(llm):
    outputs = []
    while llm.has_unfinished_requests():
        outputs += llm.step()
    return outputs


def test_get_tokenizer_round_trips_text(llm):
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"
    assert llm.llm_engine.get_tokenizer() is tokenizer


def test_llm_engine_streams_partial_outputs_then_the_finished_one(llm):
    expected = greedy(llm).outputs[0].token_ids
    llm.llm_engine.add_request("s", {"prompt_token_ids": PROMPT}, SamplingParams(**GREEDY))
    outputs = drain(llm)
    assert all(o.request_id == "s" for o in outputs)
    assert [o.finished for o in outputs] == [False] * 11 + [True]
    assert [o.outputs[0].token_ids for o in outputs] == [expected[:i] for i in range(1, 13)]
    assert outputs[-1].outputs[0].finish_reason == "length"


def test_streamed_outputs_are_snapshots(llm):
    llm.llm_engine.add_request("snap", PROMPT, SamplingParams(**GREEDY, logprobs=1))
    outputs = drain(llm)
    assert [len(o.outputs[0].logprobs) for o in outputs] == list(range(1, 13))


def test_final_only_requests_are_returned_once(llm):
    llm.llm_engine.add_request("f", PROMPT, SamplingParams(**GREEDY, output_kind=RequestOutputKind.FINAL_ONLY))
    assert [o.finished for o in drain(llm)] == [True]


def test_our_add_request_streams_only_when_asked(llm):
    llm.add_request(PROMPT, SamplingParams(**GREEDY))
    assert [o.finished for o in drain(llm)] == [True]
    llm.add_request(PROMPT, SamplingParams(**GREEDY, output_kind=RequestOutputKind.CUMULATIVE))
    assert len(drain(llm)) == 12


def test_generate_returns_finished_outputs_in_order_whatever_the_output_kind(llm):
    params = SamplingParams(**GREEDY, output_kind=RequestOutputKind.CUMULATIVE)
    outs = llm.generate([PROMPT, [7, 8]], params, use_tqdm=False)
    assert [o.finished for o in outs] == [True, True]
    assert outs[0].prompt_token_ids == PROMPT and outs[1].prompt_token_ids == [7, 8]


def test_aborted_request_is_reported_with_finish_reason_abort(llm):
    engine = llm.llm_engine
    engine.add_request("a", PROMPT, SamplingParams(**GREEDY))
    engine.add_request("b", PROMPT, SamplingParams(**GREEDY, output_kind=RequestOutputKind.FINAL_ONLY))
    llm.step()
    engine.abort_request(["a", "b"])
    outputs = drain(llm)
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outputs] == \
        [("a", True, "abort"), ("b", True, "abort")]
    assert len(outputs[0].outputs[0].token_ids) == 1
    assert engine.get_num_unfinished_requests() == 0
    assert llm.engine.block_manager.num_used_blocks == 0


def test_chat_outputs_carry_the_rendered_prompt(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.prompt == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"



def test_chat_takes_openai_content_parts_and_joins_their_text(llm):
    parts = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "be brief\n\nhi\nthere"}]
    params = SamplingParams(temperature=0, max_tokens=4)
    assert llm.chat(parts, params, use_tqdm=False)[0].prompt == llm.chat(plain, params, use_tqdm=False)[0].prompt
    assert llm.get_tokenizer().apply_chat_template(parts) == llm.get_tokenizer().apply_chat_template(plain)


USER_HI = [{"role": "user", "content": "hi"}]


def test_tokenizer_has_transformers_special_ids_and_apply_chat_template(llm):
    tok = llm.get_tokenizer()
    assert tok.bos_token_id == tok.special["<|bos|>"]
    assert tok.eos_token_id == tok.special["<|assistant_end|>"] and tok.eos_token_id in tok.eos_token_ids
    assert tok.apply_chat_template(USER_HI, add_generation_prompt=True) == tok.render_chat(USER_HI)
    assert tok.apply_chat_template(USER_HI, tokenize=False) == "<|bos|><|user_start|>hi<|user_end|>"  # HF default
    replied = USER_HI + [{"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(replied, tokenize=False, continue_final_message=True) == \
        "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>yo"
    batch = tok.apply_chat_template([USER_HI, USER_HI], chat_template=None, tools=None)  # defaults are fine
    assert batch == [tok.render_chat(USER_HI, add_generation_prompt=False)] * 2
    with pytest.raises(ValueError, match=r"apply_chat_template\(chat_template='x'\) is not supported: "
                                         r"nanochat's chat format is fixed"):
        tok.apply_chat_template(USER_HI, chat_template="x")
    with pytest.raises(TypeError, match="did you mean 'add_generation_prompt'"):
        tok.apply_chat_template(USER_HI, add_generation_promt=True)


def test_chat_and_generate_take_vllms_defaults_and_refuse_the_rest(llm):
    params = SamplingParams(temperature=0, max_tokens=2)
    plain = llm.chat(USER_HI, params, use_tqdm=False)[0]
    same = llm.chat(USER_HI, params, use_tqdm=False, add_generation_prompt=True, chat_template=None,
                    continue_final_message=False, lora_request=None, tools=None)[0]
    assert same.outputs[0].token_ids == plain.outputs[0].token_ids
    going_on = llm.chat(USER_HI + [{"role": "assistant", "content": "yo"}], params, use_tqdm=False,
                        add_generation_prompt=False, continue_final_message=True)[0]
    assert going_on.prompt.endswith("<|assistant_start|>yo")
    assert llm.generate(PROMPT, params, use_tqdm=False, lora_request=None)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=r"LLM.chat\(chat_template='{{ x }}'\) is not supported: nanochat's"):
        llm.chat(USER_HI, params, chat_template="{{ x }}")
    with pytest.raises(ValueError, match=r"LLM.generate\(lora_request='a'\) is not supported: LoRA"):
        llm.generate(PROMPT, params, lora_request="a")
    with pytest.raises(ValueError, match="set at most one of them"):
        llm.chat(USER_HI, params, continue_final_message=True)


@pytest.mark.parametrize("dtype, want", [("half", torch.float16), ("float", torch.float32),
                                         ("FLOAT32", torch.float32), ("bfloat16", torch.bfloat16),
                                         (torch.float16, torch.float16)])
def test_vllm_dtype_names_are_accepted(dtype, want):
    assert EngineConfig(model="unused", dtype=dtype).resolve_dtype(torch.float32) is want


@pytest.mark.parametrize("dtype", ["half", "float16", torch.float16])
def test_float16_on_cpu_runs_as_bfloat16_as_in_vllm_and_says_so_once(checkpoint_dir, dtype, caplog):
    with caplog.at_level(logging.WARNING, logger="microvllm"):
        llm = LLM(checkpoint_dir, dtype=dtype, num_blocks=8)
    assert llm.engine.dtype is torch.bfloat16 and next(llm.engine.model.parameters()).dtype is torch.bfloat16
    said = [r.getMessage() for r in caplog.records if "float16 is not supported on CPU" in r.getMessage()]
    assert len(said) == 1 and "running bfloat16 instead" in said[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=2), r"LLM\(tensor_parallel_size=2\) is not supported: microvllm runs"),
    (dict(trust_remote_code=True), "hold no code"),
    (dict(quantization="awq"), "is not one of .int8., .fp8., None"),
    (dict(kv_cache_dtype="fp8"), r"LLM\(kv_cache_dtype='fp8'\) is not supported: the KV cache holds the model's "
                                 r"dtype: choose it with dtype=$"),
    (dict(download_dir="/tmp/x"), r"not supported: hub models download to huggingface_hub's cache; set "
                                  r"HF_HUB_CACHE \(or HF_HOME\) to move it, or pass a local dir as model=$"),
])
def test_vllm_only_llm_arguments_are_refused_by_name(checkpoint_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(checkpoint_dir, **kwargs)


def test_vllm_defaults_are_accepted_and_typos_get_a_suggestion(checkpoint_dir):
    LLM(checkpoint_dir, tensor_parallel_size=1, trust_remote_code=False, num_blocks=8)
    with pytest.raises(TypeError, match="no argument 'max_num_seq'; did you mean 'max_num_seqs'"):
        LLM(checkpoint_dir, max_num_seq=4)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(best_of=4), ValueError, r"SamplingParams\(best_of=4\) is not supported: sample n"),
    (dict(guided_decoding={"json": {}}), ValueError, "structured_outputs=StructuredOutputsParams"),
    (dict(use_beam_search=True), ValueError, "no beam search"),
    (dict(temprature=0.5), TypeError, "did you mean 'temperature'"),
    (dict(stop="x", detokenize=False), ValueError, "stop strings need text"),
    (dict(truncate_prompt_tokens=0), ValueError, "truncate_prompt_tokens"),
    (dict(bad_words="word"), TypeError, "bad_words"),
    (dict(allowed_token_ids=[]), ValueError, "allowed_token_ids"),
    (dict(logits_processors=[lambda logits: logits]), TypeError, "must take"),
    (dict(output_kind="delta"), TypeError, "output_kind"),
])
def test_bad_or_vllm_only_sampling_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)
    SamplingParams(best_of=None, use_beam_search=False, logit_bias=None)  # vLLM's defaults are fine


def test_llm_engine_add_request_refuses_vllm_only_arguments(llm):
    with pytest.raises(ValueError, match="priority"):
        llm.llm_engine.add_request("p", PROMPT, SamplingParams(), priority=3)


def test_out_of_vocabulary_allowed_token_ids_are_refused(llm):
    with pytest.raises(ValueError, match="allowed_token_ids"):
        greedy(llm, allowed_token_ids=[10**6])


def test_detokenize_false_returns_the_same_tokens_and_no_text(llm):
    plain, silent = greedy(llm).outputs[0], greedy(llm, detokenize=False).outputs[0]
    assert silent.token_ids == plain.token_ids and plain.text and silent.text == ""


def test_truncate_prompt_tokens_keeps_the_prompts_tail(llm):
    out = greedy(llm, [9, 8] + PROMPT, truncate_prompt_tokens=5)
    assert out.prompt_token_ids == PROMPT
    assert out.outputs[0].token_ids == greedy(llm).outputs[0].token_ids


def test_allowed_token_ids_limit_every_token(llm):
    allowed = [40, 41, 42]
    tokens = greedy(llm, allowed_token_ids=allowed, temperature=1.0, seed=3).outputs[0].token_ids
    assert set(tokens) <= set(allowed)


def test_bad_words_are_never_generated(llm):
    tokens = greedy(llm).outputs[0].token_ids
    word = llm.tokenizer.decode(tokens[1:3])  # the byte tokenizer: two tokens, two bytes
    assert word.strip() == word and len(word) == 2
    out = greedy(llm, bad_words=[word]).outputs[0]
    pairs = list(zip(out.token_ids, out.token_ids[1:]))
    assert tuple(tokens[1:3]) not in pairs and out.token_ids[:2] == tokens[:2]  # only its last token is banned


def test_logits_processors_of_both_signatures_shape_the_logits(llm):
    seen = []

    def force_7(output_ids, logits):
        logits[:] = float("-inf")
        logits[7] = 0.0
        return logits

    def record(prompt_ids, output_ids, logits):
        seen.append((list(prompt_ids), list(output_ids)))
        return logits

    out = greedy(llm, logits_processors=[record, force_7], logprobs=0).outputs[0]
    assert out.token_ids == [7] * 12
    assert seen[:2] == [(PROMPT, []), (PROMPT, [7])]
    assert out.logprobs[0][7].logprob < 0  # log-probs stay the model's own


def test_greedy_outputs_beside_shaped_requests_are_unchanged(llm):
    prompts = [PROMPT, [9, 9, 9], [4, 4]]
    plain = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    shaped = SamplingParams(**GREEDY, logits_processors=[lambda ids, logits: logits], bad_words=["zz"],
                            detokenize=True, truncate_prompt_tokens=50)
    mixed = llm.generate(prompts, [SamplingParams(**GREEDY), shaped, SamplingParams(**GREEDY)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed] == [o.outputs[0].token_ids for o in plain]


def test_a_delta_stream_holds_a_cut_character_back_until_it_is_whole(llm):
    """Each step's text adds up to the decoded tokens so far, less a trailing partial UTF-8
    character; the finished stream adds up to the whole text."""
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=1.5, max_tokens=48, ignore_eos=True, seed=1,
                            output_kind=RequestOutputKind.DELTA)
    for i in range(8):
        llm.llm_engine.add_request(f"d{i}", [1, 2, 3 + i], params)
    texts, tokens, held_back = {}, {}, 0
    for output in drain(llm):
        rid, completion = output.request_id, output.outputs[0]
        texts[rid] = texts.get(rid, "") + completion.text
        tokens[rid] = tokens.get(rid, []) + completion.token_ids
        whole = tokenizer.decode(tokens[rid])
        expected = whole if output.finished else whole.rstrip("\ufffd")
        held_back += expected != whole
        assert texts[rid] == expected
    assert held_back and len(tokens) == 8


# -- the names lm-eval's vllm backend uses ---------------------------------------------

def test_prompt_types_import_where_vllm_code_imports_them():
    from microvllm.inputs import TextPrompt as InputsTextPrompt, TokensPrompt as InputsTokensPrompt
    assert (InputsTextPrompt, InputsTokensPrompt) == (microvllm.TextPrompt, microvllm.TokensPrompt)
    assert TokensPrompt(prompt_token_ids=PROMPT) == {"prompt_token_ids": PROMPT}


def test_tokens_and_text_prompts_generate_as_ids_and_text_do(llm):
    params = SamplingParams(**GREEDY)
    typed = llm.generate([TokensPrompt(prompt_token_ids=PROMPT), TextPrompt(prompt="hello")], params,
                         use_tqdm=False, lora_request=None)
    plain = llm.generate([PROMPT, "hello"], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in typed] == [PROMPT, llm.get_tokenizer().encode("hello")]
    assert [o.outputs[0].token_ids for o in typed] == [o.outputs[0].token_ids for o in plain]


def test_a_tokens_prompts_text_is_reported_while_its_ids_run(llm):
    out = llm.generate(TokensPrompt(prompt_token_ids=PROMPT, prompt="five ids"), SamplingParams(**GREEDY),
                       use_tqdm=False)[0]
    assert out.prompt == "five ids" and out.prompt_token_ids == PROMPT
    assert out.outputs[0].token_ids == greedy(llm).outputs[0].token_ids


@pytest.mark.parametrize("key", ["multi_modal_data", "cache_salt", "mm_processor_kwargs"])
def test_prompt_dict_keys_microvllm_lacks_are_refused_by_name(llm, key):
    with pytest.raises(ValueError, match=rf"prompt dict keys \['{key}'\] are not supported"):
        llm.generate({"prompt": "hi", key: {}}, SamplingParams(**GREEDY), use_tqdm=False)


def test_llm_takes_the_arguments_lm_evals_vllm_backend_passes(checkpoint_dir):
    llm = LLM(model=checkpoint_dir, revision=None, dtype="auto", tokenizer=None, tokenizer_mode="auto",
              tokenizer_revision=None, trust_remote_code=False, tensor_parallel_size=1, max_model_len=None,
              max_num_seqs=None, quantization=None, seed=1234, enable_lora=False, max_lora_rank=16, num_blocks=8)
    assert llm.generate([PROMPT], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].token_ids


def test_lora_settings_other_than_vllms_defaults_are_refused_by_name(checkpoint_dir):
    with pytest.raises(ValueError, match=r"LLM\(max_lora_rank=8\) is not supported: LoRA"):
        LLM(checkpoint_dir, max_lora_rank=8)


def test_max_num_seqs_none_means_the_default():
    assert EngineConfig(model="unused", max_num_seqs=None).max_num_seqs == DEFAULT_MAX_NUM_SEQS
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(model="unused", max_num_seqs=0)


def test_llm_engine_model_config_holds_the_resolved_max_model_len(llm, checkpoint_dir):
    assert llm.llm_engine.model_config.max_model_len == 64  # the checkpoint's sequence_len
    assert llm.llm_engine.model_config is llm.model_config
    assert llm.model_config.model == str(checkpoint_dir)


def test_spaces_between_special_tokens_false_is_accepted_and_true_refused_by_name(llm):
    params = SamplingParams(**GREEDY, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert greedy(llm).outputs[0].token_ids == llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=r"spaces_between_special_tokens=True\) is not supported: special "
                                         r"tokens decode side by side"):
        SamplingParams(spaces_between_special_tokens=True)


def test_encode_takes_transformers_add_special_tokens_for_prepend_bos(llm):
    tokenizer = llm.get_tokenizer()
    assert tokenizer.encode("h\u00e9llo", add_special_tokens=False) == tokenizer.encode("h\u00e9llo", prepend_bos=False)
    assert tokenizer.encode("h\u00e9llo", add_special_tokens=True) == tokenizer.encode("h\u00e9llo")
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id


def test_encode_refuses_prepend_bos_and_add_special_tokens_that_disagree(llm):
    with pytest.raises(ValueError, match="add_special_tokens is transformers' name for prepend_bos"):
        llm.get_tokenizer().encode("hi", prepend_bos=False, add_special_tokens=True)
