"""Scoring through the server, as lm-evaluation-harness scores through vLLM's: echo with
log-probs, vLLM's prompt_logprobs, the tokenizer routes, and log-prob entries that keep
every token apart. Scores are checked against the offline engine's prompt log-probs.
"""

import json
import os
import subprocess
import sys

import pytest

from checkpoints import byte_tokenizer
from test_serve import AUTH, MODEL, httpx, llm, llm_args, serving  # noqa: F401 (llm, llm_args: its fixtures)

from microvllm import SamplingParams
from microvllm.serve.tokenization import TokenCodec
from microvllm.tokenizer import Tokenizer
from microvllm.tokenizer_json import write_tokenizer_json

# token-id prompts as lm-eval sends them: <|bos|> (id 256) only where it put one, as in rolling windows
TOKEN_PROMPTS = [[72, 101, 108, 108, 111, 44, 32, 119], [256, 84, 111, 32, 98, 101], [65, 66]]


@pytest.fixture(scope="module")
def server(llm_args):
    with serving(llm_args, max_body_bytes=1 << 22) as url:
        yield url


def complete(url: str, **body) -> dict:
    response = httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def offline_prompt_logprobs(llm, prompt_token_ids: list[int], k: int = 1) -> list[dict | None]:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k)
    return llm.generate([{"prompt_token_ids": prompt_token_ids}], params, use_tqdm=False)[0].prompt_logprobs


def assert_close(got: list[float | None], expected: list[float | None]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g is None and e is None) or g == pytest.approx(e, abs=1e-4)


# -- lm-eval's requests ------------------------------------------------------------------

def test_loglikelihood_request_echoes_a_batch_of_token_prompts_with_the_offline_prompt_logprobs(server, llm):
    reply = complete(server, prompt=TOKEN_PROMPTS, temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    for prompt, choice in zip(TOKEN_PROMPTS, reply["choices"]):
        logprobs = choice["logprobs"]
        expected = offline_prompt_logprobs(llm, prompt)
        assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt, then the one token generated
        assert_close(logprobs["token_logprobs"][:-1],
                     [None] + [e[t].logprob for t, e in zip(prompt[1:], expected[1:])])
        assert logprobs["top_logprobs"][0] is None
        for t, top, e in zip(prompt[1:], logprobs["top_logprobs"][1:], expected[1:]):
            best = min(e.values(), key=lambda lp: lp.rank)
            assert max(top.values()) == pytest.approx(best.logprob, abs=1e-4)  # lm-eval's is_greedy reads this
            assert len(top) == (1 if e[t].rank == 1 else 2)
        assert choice["text"].startswith(llm.get_tokenizer().decode(prompt, skip_special_tokens=False))


def test_lm_evals_parser_reads_the_continuations_log_likelihood(server, llm):
    openai_completions = pytest.importorskip("lm_eval.models.openai_completions")
    prompt, context_len = TOKEN_PROMPTS[0], 5
    reply = complete(server, prompt=[prompt], temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True)
    [(score, _)] = openai_completions.LocalCompletionsAPI.parse_logprobs(reply, [prompt], [context_len])
    expected = offline_prompt_logprobs(llm, prompt)
    assert score == pytest.approx(sum(e[t].logprob for t, e in zip(prompt[context_len:], expected[context_len:])),
                                  abs=1e-4)


def test_echo_with_max_tokens_0_answers_with_the_prompt_alone(server, llm):
    reply = complete(server, prompt="ROMEO:", max_tokens=0, echo=True, logprobs=0)
    choice = reply["choices"][0]
    ids = llm.get_tokenizer().encode("ROMEO:")
    assert choice["text"] == "ROMEO:"
    assert choice["logprobs"]["tokens"][0] == "<|bos|>" and len(choice["logprobs"]["tokens"]) == len(ids)
    expected = offline_prompt_logprobs(llm, ids, 0)
    assert_close(choice["logprobs"]["token_logprobs"], [None] + [e[t].logprob for t, e in zip(ids[1:], expected[1:])])
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_without_logprobs_puts_the_prompt_text_before_the_completion(server):
    echoed = complete(server, prompt="ROMEO:", max_tokens=4, temperature=0, echo=True)["choices"][0]["text"]
    plain = complete(server, prompt="ROMEO:", max_tokens=4, temperature=0)["choices"][0]["text"]
    assert echoed == "ROMEO:" + plain


def test_a_streamed_echo_sends_the_prompt_once_then_the_completion(server):
    body = dict(prompt=TOKEN_PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=1)
    whole = complete(server, **body)["choices"][0]
    tokens, text = [], ""
    with httpx.stream("POST", server + "/v1/completions", json={"model": MODEL, **body, "stream": True},
                      headers=AUTH, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                tokens += choice["logprobs"]["tokens"]
    assert (text, tokens) == (whole["text"], whole["logprobs"]["tokens"])


# -- prompt_logprobs and fields not acted on ----------------------------------------------

def test_prompt_logprobs_come_per_choice_in_vllms_form(server, llm):
    prompt = TOKEN_PROMPTS[0]
    choice = complete(server, prompt=prompt, max_tokens=1, prompt_logprobs=2)["choices"][0]
    expected = offline_prompt_logprobs(llm, prompt, 2)
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(prompt)
    for got, e in zip(choice["prompt_logprobs"][1:], expected[1:]):
        assert {int(t) for t in got} == set(e)
        for t, lp in e.items():
            assert got[str(t)]["logprob"] == pytest.approx(lp.logprob, abs=1e-4) and got[str(t)]["rank"] == lp.rank


@pytest.mark.parametrize("route, body, param", [
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("completions", {"prompt": "x", "cache_salt": "abc"}, "cache_salt"),
    ("completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
])
def test_a_field_the_server_would_not_act_on_gets_a_400_naming_it(server, route, body, param):
    response = httpx.post(f"{server}/v1/{route}", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_vllms_older_guided_fields_constrain_the_output(server):
    pytest.importorskip("xgrammar")
    reply = complete(server, prompt="Pick:", max_tokens=8, guided_choice=["yes", "no"])
    assert reply["choices"][0]["text"] in ("yes", "no")
    reply = complete(server, prompt="Pick:", max_tokens=8, guided_regex="[ab]{3}")
    assert reply["choices"][0]["text"] in {a + b + c for a in "ab" for b in "ab" for c in "ab"}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"type": "nope"}}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
])
def test_a_bad_json_schema_gets_a_400_naming_its_field_in_xgrammars_words_alone(server, body, param):
    pytest.importorskip("xgrammar")
    response = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "x", **body}, headers=AUTH)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param
    assert error["message"] == f'{param} is not valid: Unsupported type "nope"'


def test_a_body_nested_100000_deep_gets_a_400(server):
    response = httpx.post(server + "/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and "nested" in response.json()["error"]["message"]


# -- token names ---------------------------------------------------------------------------

def test_every_token_has_a_name_of_its_own(llm):
    codec = TokenCodec(llm.get_tokenizer())
    names = [codec.token_text(t) for t in range(llm.get_tokenizer().vocab_size)]
    assert len(set(names)) == len(names)
    assert names[0xC3] == "bytes:\\xc3" and names[ord("a")] == "a"  # half a character: its byte, as vLLM writes it


def test_a_tokenizer_json_names_and_encodes_as_the_tiktoken_tokenizer_does(tmp_path):
    pytest.importorskip("tokenizers")
    write_tokenizer_json(byte_tokenizer(), tmp_path)
    pkl, json_ = TokenCodec(Tokenizer(byte_tokenizer())), TokenCodec(Tokenizer.from_dir(tmp_path))
    assert [pkl.token_text(t) for t in range(265)] == [json_.token_text(t) for t in range(265)]
    text = "h\u00e9llo <|bos|>w\u00f6rld<|user_start|>"
    assert pkl.encode(text) == json_.encode(text)


def test_top_logprobs_keep_partial_byte_tokens_apart(server):
    # the sampled tokens begin two-byte characters: alone, each decodes to U+FFFD, as do
    # half of the byte tokenizer's tokens, some of which are among the most likely
    body = dict(prompt="x", max_tokens=8, logprobs=5, allowed_token_ids=[0xC3, 0xC4], seed=0, temperature=1)
    by_name = complete(server, **body)["choices"][0]["logprobs"]
    by_id = complete(server, **body, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    assert set(by_name["tokens"]) <= {"bytes:\\xc3", "bytes:\\xc4"}
    assert [len(top) for top in by_name["top_logprobs"]] == [len(top) for top in by_id["top_logprobs"]]
    assert all(token in top for token, top in zip(by_name["tokens"], by_name["top_logprobs"]))
    assert sum(name.startswith("bytes:") for top in by_name["top_logprobs"] for name in top) > len(by_name["tokens"])


def test_completions_top_logprobs_hold_the_sampled_token_even_outside_the_top_k(server):
    reply = complete(server, prompt=TOKEN_PROMPTS[0], max_tokens=16, logprobs=1, temperature=3, seed=7,
                     return_tokens_as_token_ids=True)
    logprobs = reply["choices"][0]["logprobs"]
    assert all(token in top and len(top) <= 2 for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]))
    assert any(len(top) == 2 for top in logprobs["top_logprobs"])  # some sampled token was not the most likely


def test_return_tokens_as_token_ids_names_tokens_by_id(server, llm):
    prompt = TOKEN_PROMPTS[1]
    reply = complete(server, prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True,
                     return_tokens_as_token_ids=True)
    offline = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=3),
                           use_tqdm=False)[0].outputs[0].token_ids
    assert reply["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in prompt + offline]


# -- the tokenizer routes --------------------------------------------------------------------

def test_tokenize_gives_the_token_ids_a_text_prompt_runs_as(server, llm):
    tokenizer = llm.get_tokenizer()
    tokens = httpx.post(server + "/tokenize", json={"prompt": "ROMEO:"}).json()
    assert tokens["tokens"] == tokenizer.encode("ROMEO:") and tokens["count"] == len(tokens["tokens"])
    echoed = complete(server, prompt="ROMEO:", max_tokens=0, echo=True, logprobs=0, return_tokens_as_token_ids=True)
    assert echoed["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in tokens["tokens"]]
    bare = httpx.post(server + "/tokenize", json={"prompt": "ROMEO:", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode("ROMEO:", prepend_bos=False)


def test_tokenize_reads_special_token_names_as_those_tokens(server, llm):
    tokenizer = llm.get_tokenizer()
    tokens = httpx.post(server + "/tokenize", json={"prompt": "<|bos|>a<|user_start|>", "add_special_tokens": False})
    assert tokens.json()["tokens"] == [tokenizer.bos_id, ord("a"), tokenizer.special["<|user_start|>"]]


def test_tokenize_renders_a_conversation_as_chat_completions_do(server, llm):
    messages = [{"role": "user", "content": "hi"}]
    tokens = httpx.post(server + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert tokens == llm.get_tokenizer().render_chat(messages)


def test_detokenize_gives_the_text_with_special_tokens(server, llm):
    ids = llm.get_tokenizer().encode("ROMEO:")
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json() == {"prompt": "<|bos|>ROMEO:"}
    response = httpx.post(server + "/detokenize", json={"tokens": [0, 10**6]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


def test_lm_evals_remote_tokenizer_probe_finds_the_routes(server, llm):
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    assert lm_eval_utils.check_remote_tokenizer_support(server + "/v1/completions")
    remote = lm_eval_utils.RemoteTokenizer(server + "/v1/completions")
    tokenizer = llm.get_tokenizer()
    assert remote.bos_token_id == tokenizer.bos_id and remote.eos_token_id == tokenizer.eos_token_id
    assert remote.encode("To be") == tokenizer.encode("To be", prepend_bos=False)
    assert remote.decode(tokenizer.encode("To be")) == "<|bos|>To be"


# -- lm-eval end to end ----------------------------------------------------------------------

TASKS = {
    "tiny_choice": dict(output_type="multiple_choice", doc_to_text="{{question}}", doc_to_target="{{answer}}",
                        doc_to_choice="{{choices}}", target_delimiter="", metric_list=[{"metric": "acc"}]),
    "tiny_rolling": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                         metric_list=[{"metric": "word_perplexity"}]),
    "tiny_generate": dict(output_type="generate_until", doc_to_text="{{question}}", doc_to_target="{{answer}}",
                          generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                          metric_list=[{"metric": "exact_match"}]),
}
DOCS = [{"question": "To be, or not to", "choices": [" be", " go", " see"], "answer": 0, "text": "ROMEO: Peace!"},
        {"question": "Now is the winter", "choices": [" of", " at"], "answer": 1, "text": "Friends, Romans."}]


def write_tasks(directory) -> None:
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, config in TASKS.items():
        data_files = {"test": str(directory / "docs.jsonl")}
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files},
                "test_split": "test", **config}
        (directory / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML


@pytest.mark.slow
def test_lm_eval_scores_through_the_server_as_the_offline_engine_does(server, llm, tmp_path):
    for module in ("lm_eval", "aiohttp", "tenacity"):  # lm-eval[api]
        pytest.importorskip(module)
    write_tasks(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={server}/v1/completions,model={MODEL},tokenizer_backend=remote,num_concurrent=1,"
               f"max_retries=1", "--tasks", ",".join(TASKS), "--include_path", str(tmp_path),
               "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OPENAI_API_KEY": AUTH["Authorization"][7:],
                                 "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    samples = {name: [json.loads(line) for line in path.read_text().splitlines()]
               for path in out.rglob("samples_*.jsonl") for name in TASKS if f"samples_{name}_" in path.name}
    assert set(samples) == set(TASKS)
    tokenizer = llm.get_tokenizer()
    encode = lambda text: tokenizer.encode(text, prepend_bos=False)  # noqa: E731
    for sample in samples["tiny_choice"]:
        context = encode(sample["doc"]["question"])
        for choice, ((score, _),) in zip(sample["doc"]["choices"], sample["resps"]):
            prompt = context + encode(choice)
            expected = offline_prompt_logprobs(llm, prompt)
            assert float(score) == pytest.approx(sum(e[t].logprob for t, e in zip(
                prompt[len(context):], expected[len(context):])), abs=1e-3)
    for sample in samples["tiny_rolling"]:
        prompt = [tokenizer.bos_id] + encode(sample["doc"]["text"])  # one window, opened by <|bos|>
        expected = offline_prompt_logprobs(llm, prompt)
        assert float(sample["resps"][0][0]) == pytest.approx(
            sum(e[t].logprob for t, e in zip(prompt[1:], expected[1:])), abs=1e-3)
    for sample in samples["tiny_generate"]:  # sent as token ids, without <|bos|>, as lm-eval sends them
        params = SamplingParams(temperature=0, max_tokens=6, stop=["\n"])
        offline = llm.generate({"prompt_token_ids": encode(sample["doc"]["question"])}, params, use_tqdm=False)
        assert sample["resps"][0][0] == offline[0].outputs[0].text
