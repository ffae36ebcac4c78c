"""Every bad input gets a clear error naming the problem; the engine then still serves."""

import json
import pickle

import pytest
import torch

from microvllm import LLM, SamplingParams
from checkpoints import byte_tokenizer, write_checkpoint


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir)


def still_serves(llm):
    out = llm.generate(["ok"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k must be an int >= -1"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(n=0), "n must be an int >= 1"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens=5 must be <= max_tokens=2"),
    (dict(stop=""), "stop strings must be non-empty"),
    (dict(stop=["a", ""]), "stop strings must be non-empty"),
    (dict(logprobs=21), r"logprobs must be an int in \[0, 20\]"),
    (dict(prompt_logprobs=-1), r"prompt_logprobs must be an int in \[0, 20\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(n=1.5), "n must be an int"),
    (dict(stop_token_ids=[-1]), r"stop_token_ids\[0\] must be an int >= 0"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, message", [
    ("", None),  # an empty string still has its BOS: it is a valid prompt
    ([], "prompt is empty"),
    ({"prompt_token_ids": []}, "prompt is empty"),
    ([1, -1], r"out of vocabulary: ids must be in \[0, 265\)"),
    ([1, 265], r"out of vocabulary: ids must be in \[0, 265\)"),
    ([1, 2.0], "must be ints"),
    ([1, "a"], "must be ints"),
    (42, "a prompt must be"),
    ({"text": "x"}, "a prompt dict needs a str 'prompt' or a list 'prompt_token_ids'"),
    (list(range(64)), "must be shorter than max_model_len=64"),
])
def test_bad_prompts(llm, prompt, message):
    if message is None and prompt == "":
        assert llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        return
    with pytest.raises((ValueError, TypeError), match=message):
        llm.generate([[5, 6, 7], prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    still_serves(llm)


def test_sampling_params_list_of_wrong_length(llm):
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    still_serves(llm)


def test_stop_token_id_out_of_vocab(llm):
    with pytest.raises(ValueError, match=r"stop_token_ids \[999\] are out of vocabulary"):
        llm.generate(["a"], SamplingParams(stop_token_ids=[999]), use_tqdm=False)
    still_serves(llm)


def test_duplicate_request_id(llm):
    llm.add_request("a", request_id="same")
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("b", request_id="same")
    while llm.has_unfinished_requests():
        llm.step()
    still_serves(llm)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_blocks=0), "a KV cache of at least one block"),
    (dict(num_blocks=3), "fewer than one sequence of max_model_len=64"),
    (dict(kv_cache_memory=1000), "fewer than one sequence"),
    (dict(block_size=12), "block_size=12 must be a power of two"),
    (dict(block_size=0), "block_size must be an int >= 1"),
    (dict(device="tpu"), "device"),
    (dict(device="cuda"), "CUDA is not available"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(attention_backend="magic"), "attention_backend='magic' is not one of"),
    (dict(attention_backend="flash_attn"), "flash_attn"),
    (dict(max_num_seqs=0), "max_num_seqs must be an int >= 1"),
    (dict(max_model_len=1), "max_model_len must be an int >= 2"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
])
def test_bad_engine_settings(checkpoint_dir, kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises((ValueError, TypeError), match=message):
        LLM(checkpoint_dir, **kwargs)


def test_max_model_len_past_the_sequence_len_needs_the_override(checkpoint_dir, monkeypatch):
    monkeypatch.delenv("MICROVLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(ValueError, match=r"max_model_len=65 is longer than the model's sequence_len=64 .*"
                                         r"MICROVLLM_ALLOW_LONG_MAX_MODEL_LEN=1"):
        LLM(checkpoint_dir, max_model_len=65)
    assert LLM(checkpoint_dir, max_model_len=64).engine.max_model_len == 64
    monkeypatch.setenv("MICROVLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # meant: allowed
    assert LLM(checkpoint_dir, max_model_len=65, num_blocks=32).engine.max_model_len == 65


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(tmp_path / "nope")


def test_dir_without_model_files(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no model: looked for nanochat's model_<step>.pt"):
        LLM(tmp_path)


def test_missing_step(checkpoint_dir):
    with pytest.raises(ValueError, match=r"step=7 has no checkpoint .* available steps: \[100\]"):
        LLM(checkpoint_dir, step=7)


def test_missing_meta(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    (directory / "meta_000100.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta_000100.json is missing"):
        LLM(directory)


def test_corrupt_meta(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    (directory / "meta_000100.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LLM(directory)


def test_meta_without_model_config(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    (directory / "meta_000100.json").write_text(json.dumps({"step": 100}))
    with pytest.raises(ValueError, match="has no 'model_config'"):
        LLM(directory)


def test_corrupt_weights(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    (directory / "model_000100.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a loadable weights-only state dict"):
        LLM(directory)


def test_unknown_architecture_keys(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    path = directory / "model_000100.pt"
    state = torch.load(path, weights_only=True)
    state["transformer.h.0.attn.rope_gate.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unknown keys \['transformer.h.0.attn.rope_gate.weight'\]"):
        LLM(directory)


def test_prototype_checkpoint_is_refused(tmp_path):
    directory = write_checkpoint(tmp_path / "m", era="B")
    path = directory / "model_000100.pt"
    state = torch.load(path, weights_only=True)
    state["v0_lambdas"] = torch.zeros(4)
    torch.save(state, path)
    with pytest.raises(ValueError, match="short-lived nanochat prototype .*v0_lambdas"):
        LLM(directory)


def test_mismatched_shape(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    meta = json.loads((directory / "meta_000100.json").read_text())
    meta["model_config"]["n_embd"] = 64
    meta["model_config"]["n_head"] = 8
    (directory / "meta_000100.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has shape .* expected"):
        LLM(directory)


def test_missing_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    directory = write_checkpoint(tmp_path / "m", tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer.pkl or tokenizer.json found; looked in"):
        LLM(directory)


def test_tokenizer_found_one_level_up_and_in_base_dir(tmp_path, monkeypatch):
    directory = write_checkpoint(tmp_path / "checkpoints" / "d4", tokenizer=False)
    (tmp_path / "base" / "tokenizer").mkdir(parents=True)
    with open(tmp_path / "base" / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(byte_tokenizer(), f)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    assert LLM(directory).tokenizer.vocab_size == 265
    (tmp_path / "base").rename(tmp_path / "checkpoints" / "tokenizer_dir")
    (tmp_path / "checkpoints" / "tokenizer_dir" / "tokenizer").rename(tmp_path / "checkpoints" / "tokenizer")
    assert LLM(directory).tokenizer.vocab_size == 265


def test_tokenizer_of_wrong_vocab_size(tmp_path):
    directory = write_checkpoint(tmp_path / "m")
    import tiktoken
    small = byte_tokenizer()
    ranks = dict(small._mergeable_ranks)
    ranks[b"ab"] = 256
    bigger = tiktoken.Encoding(name="b", pat_str=small._pat_str, mergeable_ranks=ranks,
                               special_tokens={t: i + 1 for t, i in small._special_tokens.items()})
    with open(directory / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(bigger, f)
    with pytest.raises(ValueError, match="tokenizer has 266 tokens but the model's vocab_size is 265"):
        LLM(directory)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_tokenizer_pickle_cannot_run_code(tmp_path, capsys):
    directory = write_checkpoint(tmp_path / "m")
    with open(directory / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(ValueError, match="builtins.print; only tiktoken.core.Encoding is allowed"):
        LLM(directory)
    assert "pwned" not in capsys.readouterr().out


def test_checkpoint_cannot_run_code(tmp_path, capsys):
    directory = write_checkpoint(tmp_path / "m")
    with open(directory / "model_000100.pt", "wb") as f:
        torch.save({"x": Exploit()}, f)
    with pytest.raises(ValueError, match="not a loadable weights-only state dict"):
        LLM(directory)
    assert "pwned" not in capsys.readouterr().out


# -- settings of the wrong type or out of range name the setting --------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stop_token_ids=5), TypeError, "stop_token_ids must be a list of ints"),
    (dict(stop_token_ids=[1, "2"]), TypeError, r"stop_token_ids\[1\] must be an int"),
    (dict(stop=5), TypeError, "stop must be a str, a list of str or None"),
    (dict(stop=["a", 5]), TypeError, r"stop\[1\] must be a non-empty str"),
    (dict(ignore_eos="no"), TypeError, "ignore_eos must be True or False"),
    (dict(skip_special_tokens=1), TypeError, "skip_special_tokens must be True or False"),
    (dict(temperature="0.5"), TypeError, "temperature must be"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an int"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_sampling_params_of_the_wrong_type(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(logit_softcap=0), ValueError, "logit_softcap must be a finite number > 0"),
    (dict(logit_softcap=-15), ValueError, "logit_softcap"),
    (dict(logit_softcap=float("nan")), ValueError, "logit_softcap"),
    (dict(gpu_memory_utilization="0.5"), TypeError, "gpu_memory_utilization must be a number in"),
    (dict(kv_cache_memory=float("inf")), ValueError, "kv_cache_memory must be a finite number of bytes"),
    (dict(kv_cache_memory=2.0**60), ValueError, "more than the .* GiB of memory on cpu"),
    (dict(num_blocks=10**12), ValueError, "more than the .* GiB of memory on cpu"),
    (dict(step="100"), TypeError, "step must be an int"),
    (dict(enable_prefix_caching="no"), TypeError, "enable_prefix_caching must be True or False"),
    (dict(enforce_eager=None), TypeError, "enforce_eager must be True or False"),
    (dict(device=0), TypeError, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (dict(dtype=16), TypeError, "dtype must be one of"),
    (dict(attention_backend=None), TypeError, "attention_backend must be one of"),
    (dict(max_num_batched_tokens=0), ValueError, "max_num_batched_tokens must be an int >= 1"),
    (dict(seed="x"), TypeError, "seed must be an int"),
])
def test_engine_settings_of_the_wrong_type_or_range(checkpoint_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        LLM(checkpoint_dir, **kwargs)


def test_model_given_a_file_or_a_number(checkpoint_dir):
    with pytest.raises(ValueError, match=r"is a file; give the directory that holds it"):
        LLM(checkpoint_dir / "model_000100.pt")
    with pytest.raises(TypeError, match="model must be a directory path"):
        LLM(5)


def test_sampling_params_must_be_sampling_params(llm):
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, a list of them"):
        llm.generate(["a"], "temperature=0", use_tqdm=False)
    with pytest.raises(TypeError, match=r"sampling_params\[1\] must be a SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams(), {"temperature": 0}], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.add_request("a", {"temperature": 0})
    with pytest.raises(TypeError, match="use_tqdm must be True or False"):
        llm.generate(["a"], use_tqdm="no")
    with pytest.raises(TypeError, match="prompts must be a prompt or a list of prompts"):
        llm.generate(None, use_tqdm=False)
    still_serves(llm)


@pytest.mark.parametrize("messages, error, message", [
    ("hello", TypeError, "messages must be a conversation"),
    (["hello", "there"], TypeError, r"messages\[0\] must be a conversation"),
    ([{"role": "user"}], ValueError, "message 0 has no 'content'"),
    ([{"content": "hi"}], ValueError, "message 0 has no 'role'"),
    ([{"role": "user", "content": 5}], TypeError, "message 0's content must be a str or a list of"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ValueError,
     "message 0's content part 0 must be a {'type': 'text', 'text': str} dict .* got type 'image_url'"),
    ([{"role": "user", "content": ["hi"]}], ValueError, "content part 0 .* got str"),
    ([[{"role": "user", "content": "hi"}], [{"role": "system"}]], ValueError,
     "message 0 of conversation 1 has no 'content'"),
])
def test_chat_refuses_malformed_conversations(llm, messages, error, message):
    with pytest.raises(error, match=message):
        llm.chat(messages, use_tqdm=False)
    still_serves(llm)


def test_numpy_numbers_are_accepted(llm):
    import numpy as np
    params = SamplingParams(n=np.int64(1), temperature=np.float32(0), max_tokens=np.int32(3), ignore_eos=True)
    out = llm.generate([np.array([1, 2, 3]).tolist(), [np.int64(4), np.int64(5)]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert type(params.max_tokens) is int and all(type(t) is int for t in out[1].prompt_token_ids)


# -- malformed checkpoints, meta files and tokenizers ---------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"x": 5}), "x holds a int, not a tensor"),
    (lambda s: s.update({1: torch.zeros(1)}), r"keys must be parameter names \(str\), got 1"),
    (lambda s: s.update({"transformer.wte.weight": s["transformer.wte.weight"].long()}),
     "transformer.wte.weight has dtype torch.int64; weights must be floating point"),
])
def test_malformed_state_dicts(tmp_path, change, message):
    directory = write_checkpoint(tmp_path / "m")
    path = directory / "model_000100.pt"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match=message):
        LLM(directory)


@pytest.mark.parametrize("field, value, error, message", [
    ("n_head", 0, ValueError, "model_config.n_head must be an int >= 1, got 0"),
    ("n_kv_head", 0, ValueError, "model_config.n_kv_head must be an int >= 1"),
    ("sequence_len", 0, ValueError, "model_config.sequence_len must be an int >= 2"),
    ("n_layer", "4", TypeError, "model_config.n_layer must be an int"),
    ("window_pattern", 7, TypeError, "model_config.window_pattern must be a str of 'S' and 'L'"),
    ("window_pattern", "SXL", ValueError, "must be made of 'S' and 'L'"),
])
def test_malformed_meta_fields(tmp_path, field, value, error, message):
    directory = write_checkpoint(tmp_path / "m")
    meta = json.loads((directory / "meta_000100.json").read_text())
    meta["model_config"][field] = value
    (directory / "meta_000100.json").write_text(json.dumps(meta))
    with pytest.raises(error, match=message):
        LLM(directory)


def test_tokenizer_naming_a_registry_encoding_is_refused_without_download(tmp_path, monkeypatch):
    import tiktoken.registry
    directory = write_checkpoint(tmp_path / "m")
    encoding = byte_tokenizer()
    # tiktoken pickles a registered encoding as its bare name
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, encoding.name, encoding)
    with open(directory / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(encoding, f)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, encoding.name)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to fetch a registry encoding")

    monkeypatch.setattr(tiktoken.registry, "get_encoding", no_download)
    with pytest.raises(ValueError, match="only names tiktoken's registry encoding"):
        LLM(directory)
