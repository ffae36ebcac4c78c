"""The transformers format, checked against transformers' own NanoChatForCausalLM.

Random models are built and saved by transformers itself (save_pretrained), with a
tokenizer.json from transformers' own tiktoken converter, so neither side of the
comparison is ours. Greedy tokens must be identical and log-probs within 2e-3 (fp32).
"""

import base64
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow  # transformers models and conversions

from benchmarks.random_checkpoint import tokenizer_with_vocab  # noqa: E402
from checkpoints import write_checkpoint  # noqa: E402
from microvllm import LLM, SamplingParams  # noqa: E402
from microvllm.convert import main as convert_main  # noqa: E402
from microvllm.convert import nanochat_to_transformers, transformers_to_nanochat  # noqa: E402
from microvllm.tokenizer import Tokenizer  # noqa: E402
from microvllm.tokenizer_json import TokenizerJson, encoding_from_tokenizer_json, write_tokenizer_json  # noqa: E402
from microvllm.serve.tokenization import TokenCodec  # noqa: E402

VOCAB = 400  # 256 bytes, 135 two-byte merges, 9 special tokens
PROMPTS = ["hello world", "The quick brown fox jumps", "a", "1234 5678 90 <|bos|> tail"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0, prompt_logprobs=0)
TEXTS = ["Hello world", "it's 12345 h\u00e9llo \U0001F30D\n\n  x", "<|assistant_end|> stays text", "  \t\r\n", ""]


def write_transformers_tokenizer(encoding, directory):
    """tokenizer.json as transformers' own tiktoken converter writes it."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks_file = directory / "ranks.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                  for token, rank in encoding._mergeable_ranks.items()))
    TikTokenConverter(vocab_file=str(ranks_file), pattern=encoding._pat_str,
                      extra_special_tokens=encoding._special_tokens).converted().save(str(directory / "tokenizer.json"))
    ranks_file.unlink()


def random_transformers_model(directory, vocab_rows=VOCAB, tie_word_embeddings=False, seed=0):
    """A random NanoChatForCausalLM saved with save_pretrained, and its tokenizer.json."""
    config = transformers.NanoChatConfig(
        vocab_size=vocab_rows, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings)
    model = transformers.NanoChatForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights big enough that the logits are far from uniform
        for name, param in model.named_parameters():
            scale = 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(directory)
    write_transformers_tokenizer(tokenizer_with_vocab(VOCAB), directory)
    return model


def transformers_logprobs(model, token_ids):
    """log-probs over the real vocabulary at every position, by a full forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0, :, :VOCAB].float()
    return logits.log_softmax(-1)


def assert_matches_transformers(model, outputs):
    for out in outputs:
        completion = out.outputs[0]
        prompt_len = len(out.prompt_token_ids)
        logprobs = transformers_logprobs(model, out.prompt_token_ids + completion.token_ids)
        predicted = logprobs[prompt_len - 1:-1]
        assert completion.token_ids == predicted.argmax(-1).tolist()
        ours = torch.tensor([completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)])
        theirs = predicted[torch.arange(len(completion.token_ids)), completion.token_ids]
        assert (ours - theirs).abs().max() < 2e-3
        prompt_ids = out.prompt_token_ids
        ours = torch.tensor([out.prompt_logprobs[j][prompt_ids[j]].logprob for j in range(1, prompt_len)])
        theirs = logprobs[torch.arange(prompt_len - 1), prompt_ids[1:]]
        assert (ours - theirs).abs().max() < 2e-3


def engine(model, **kwargs):
    return LLM(model, device="cpu", dtype="float32", kv_cache_memory=2**22, **kwargs)


@pytest.mark.parametrize("vocab_rows, tied", [(VOCAB, False), (448, True)], ids=["untied", "padded-tied"])
def test_generation_matches_transformers_batched_and_alone(tmp_path, vocab_rows, tied):
    reference = random_transformers_model(tmp_path, vocab_rows, tied)
    llm = engine(tmp_path)
    batched = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]
    assert_matches_transformers(reference, batched)
    assert_matches_transformers(reference, alone)


def test_tokenizer_json_encodes_and_decodes_like_tiktoken(tmp_path):
    encoding = tokenizer_with_vocab(VOCAB)
    write_transformers_tokenizer(encoding, tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert isinstance(ours.encoding, TokenizerJson)
    for text in TEXTS:
        ids = encoding.encode_ordinary(text)
        assert ours.encode(text, prepend_bos=False) == ids
        assert ours.decode(ids) == encoding.decode(ids, errors="replace")
    assert ours.special == Tokenizer(encoding).special
    assert ours.decode(encoding.encode_ordinary("\U0001F30D")[:2]) == "\ufffd"  # a cut character
    plain = [t for t in range(VOCAB) if t not in ours.special_ids]  # the bytes structured outputs match
    assert [ours.encoding.decode_single_token_bytes(t) for t in plain] == \
        [encoding.decode_single_token_bytes(t) for t in plain]


def test_written_tokenizer_json_matches_transformers_and_tiktoken(tmp_path):
    encoding = tokenizer_with_vocab(VOCAB)
    write_tokenizer_json(encoding, tmp_path)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert fast.encode(text, add_special_tokens=False, split_special_tokens=True) == encoding.encode_ordinary(text)
    assert fast.convert_tokens_to_ids("<|assistant_end|>") == encoding.encode_single_token("<|assistant_end|>")
    back = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert back._mergeable_ranks == encoding._mergeable_ranks and back._special_tokens == encoding._special_tokens


BOS_TEXTS = TEXTS + ["na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001F600\U0001F30D", "<|bos|> in the middle <|bos|>"]


def test_written_tokenizer_dir_encodes_text_as_the_server_does_bos_first(tmp_path):
    encoding = tokenizer_with_vocab(VOCAB)
    write_tokenizer_json(encoding, tmp_path)
    server, theirs = TokenCodec(Tokenizer(encoding)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in BOS_TEXTS:
        assert theirs(text).input_ids == theirs.encode(text) == server.encode(text)
        assert theirs.encode(text)[0] == theirs.bos_token_id == server.tokenizer.bos_id


def test_written_tokenizer_json_file_alone_prepends_bos(tmp_path):
    import tokenizers
    encoding = tokenizer_with_vocab(VOCAB)
    write_tokenizer_json(encoding, tmp_path)
    server = TokenCodec(Tokenizer(encoding))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in BOS_TEXTS:
        assert fast.encode(text) == raw.encode(text).ids == server.encode(text)


def test_write_tokenizer_json_creates_its_missing_dir(tmp_path):
    directory = tmp_path / "not" / "yet"
    write_tokenizer_json(tokenizer_with_vocab(VOCAB), directory)
    assert transformers.AutoTokenizer.from_pretrained(directory).encode("hi") == \
        Tokenizer(tokenizer_with_vocab(VOCAB)).encode("hi")


def test_tokenizer_json_from_transformers_converts_back_to_the_same_tiktoken(tmp_path):
    encoding = tokenizer_with_vocab(VOCAB)
    write_transformers_tokenizer(encoding, tmp_path)
    back = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert back._mergeable_ranks == encoding._mergeable_ranks
    assert back._special_tokens == encoding._special_tokens and back._pat_str == encoding._pat_str


def test_native_checkpoint_converts_to_transformers_and_back_unchanged(tmp_path):
    native = write_checkpoint(tmp_path / "native", era="A", window_pattern=None)
    hf = nanochat_to_transformers(native, tmp_path / "hf")
    back = transformers_to_nanochat(hf, tmp_path / "back", step=100)
    runs = [engine(m).generate(PROMPTS, GREEDY, use_tqdm=False) for m in (native, hf, back)]
    for outputs in runs[1:]:
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in runs[0]]
        assert [o.outputs[0].cumulative_logprob for o in outputs] == \
            [o.outputs[0].cumulative_logprob for o in runs[0]]
    state, state_back = (torch.load(d / "model_000100.pt", weights_only=True) for d in (native, back))
    assert state.keys() == state_back.keys() and all(torch.equal(state[k], state_back[k]) for k in state)
    # transformers opens the export and agrees with the native model
    reference = transformers.NanoChatForCausalLM.from_pretrained(hf).eval()
    vocab = json.loads((native / "meta_000100.json").read_text())["model_config"]["vocab_size"]
    for out in runs[0]:
        ids = out.prompt_token_ids + out.outputs[0].token_ids
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([ids])).logits[0, len(out.prompt_token_ids) - 1:-1, :vocab]
        assert logits.argmax(-1).tolist() == out.outputs[0].token_ids


def test_convert_command_picks_the_direction_from_the_source(tmp_path, capsys):
    native = write_checkpoint(tmp_path / "native", era="A", window_pattern=None)
    convert_main([str(native), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    assert "transformers" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--step", "7"])
    assert "nanochat checkpoint" in capsys.readouterr().out
    assert (tmp_path / "back" / "meta_000007.json").is_file()
    assert (tmp_path / "back" / "tokenizer" / "tokenizer.pkl").is_file()


def test_later_eras_do_not_convert_to_transformers(tmp_path):
    native = write_checkpoint(tmp_path / "native", era="E")
    with pytest.raises(ValueError, match="era-E checkpoint .* only era-A"):
        nanochat_to_transformers(native, tmp_path / "hf")


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    random_transformers_model(directory)
    return directory


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llama"), "model_type 'llama', not 'nanochat'"),
    (dict(rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}), "rope_theta=100000.0"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(intermediate_size=100), "intermediate_size=100"),
    (dict(final_logit_softcapping=None), "final_logit_softcapping=None"),
    (dict(vocab_size=300), "tokenizer has 400 tokens but config.json's vocab_size is 300"),
])
def test_unsupported_transformers_configs_are_named(tmp_path, saved_model, changes, message):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((saved_model / name).read_bytes())
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        engine(tmp_path)


def test_transformers_dir_without_safetensors_says_so(tmp_path, saved_model):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((saved_model / name).read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors .*pytorch_model.bin is a pickle"):
        engine(tmp_path)


def test_step_is_refused_for_a_transformers_dir(saved_model):
    with pytest.raises(ValueError, match="step=3 .* transformers format"):
        engine(saved_model, step=3)
