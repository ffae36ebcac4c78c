"""The OpenAI-compatible server, driven over loopback HTTP by the official `openai` client.

Most tests share one server (uvicorn in a thread of the test process, its engine in a
process of its own); the command-line tests start `python -m microvllm.serve` itself.
"""

import asyncio
import contextlib
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from microvllm import LLM, SamplingParams  # noqa: E402
from microvllm.serve.api import ServerSettings, build_app  # noqa: E402
from microvllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput  # noqa: E402
from microvllm.serve.async_engine import AsyncEngine  # noqa: E402
from microvllm.serve.deltas import joined_deltas  # noqa: E402
from microvllm.serve.engine_process import EngineProcess  # noqa: E402
from microvllm.serve.wire import packed, unpacked  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["To be, or not to be", "ROMEO:", "Now is the winter", "Friends, Romans,"] * 16  # 64 clients
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})  # the client's arguments
OFFLINE_GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@contextlib.contextmanager
def serving(llm_args: dict, max_seqs_in_flight: int = 1024, request_timeout_s: float | None = 60.0,
            stream_interval: int = 1, **settings):
    """A server for LLM(**llm_args) on a free loopback port, in a thread; yields its base url."""
    # float32 as the offline LLMs here: the engine's process does not see conftest's default
    engine = AsyncEngine(EngineProcess({"device": "cpu", "dtype": "float32", **llm_args}, stream_interval),
                         max_seqs_in_flight, request_timeout_s)
    app = build_app(engine, ServerSettings(**{"model_name": MODEL, "api_key": KEY, "max_body_bytes": 1 << 16,
                                              "max_n": 8, **settings}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


@pytest.fixture(scope="module")
def llm_args(make_checkpoint):
    # sequence_len 256: room for a stream long enough to be cut off mid-way
    return {"model": str(make_checkpoint(seq_len=256)), "num_blocks": 256, "block_size": 16}


@pytest.fixture(scope="module")
def llm(llm_args):
    return LLM(**llm_args, device="cpu")


@pytest.fixture(scope="module")
def offline(llm):
    """What LLM.generate gives for PROMPTS, greedy: the server must give the same."""
    return [o.outputs[0].text for o in llm.generate(PROMPTS[:4], OFFLINE_GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def server(llm_args):
    with serving(llm_args) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {name: float(value) for name, value in re.findall(r"^microvllm_(\w+) (\S+)$", text, re.M)}


# -- what a client sees ------------------------------------------------------------------

def test_completion_is_the_offline_generate_output(client, offline):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY)
    assert reply.choices[0].text == offline[0]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12


def test_a_list_of_prompts_gets_one_choice_each_in_order(client, offline):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[:3], **GREEDY)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == offline[:3]


def test_chat_reply_is_the_offline_chat_output(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=10)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_streamed_completion_adds_up_to_the_whole_one_then_usage(client, offline):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline[1]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_stream_interval_sends_several_steps_in_a_chunk_and_the_same_text(llm_args, offline):
    with serving(llm_args, stream_interval=4) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True, **GREEDY))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == offline[1]
    assert len(texts) <= 4  # 12 tokens, 4 steps a chunk


def test_streamed_chat_opens_with_the_role(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True, max_tokens=5, temperature=0))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_2_gives_two_seeded_completions(client, llm):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    expected = [c.text for c in llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs]
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[2], n=2, temperature=1.0, seed=7,
                                      max_tokens=8, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected


def test_stop_string_ends_the_completion_before_it(client, offline):
    stop = offline[0][len(offline[0]) // 2:][:3]
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], stop=[stop], **GREEDY)
    assert reply.choices[0].text == offline[0][:offline[0].index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs_come_in_the_legacy_completions_form(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=2, **GREEDY)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 12
    # the 2 most likely tokens, and the sampled one where it is not among them
    assert all(2 <= len(top) <= 3 and token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))


def test_structured_outputs_hold_the_output_to_a_regex_or_a_choice(client):
    pytest.importorskip("xgrammar")
    reply = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16,
                                      extra_body={"structured_outputs": {"regex": "[ab]{3}"}})
    assert all(re.fullmatch("[ab]{3}", c.text) and c.finish_reason == "stop" for c in reply.choices)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes?"}],
                                           max_tokens=8, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert reply.choices[0].message.content in ("yes", "no")


def test_response_format_json_schema_gives_json_of_the_schema(client):
    pytest.importorskip("xgrammar")
    schema = {"type": "string", "enum": ["red", "green"]}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A colour?"}], max_tokens=16,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}})
    assert json.loads(reply.choices[0].message.content) in ("red", "green")


def test_a_structured_output_that_does_not_compile_gets_a_400(server):
    pytest.importorskip("xgrammar")
    response = httpx.post(server + "/v1/completions", headers=AUTH,
                          json={"prompt": "x", "structured_outputs": {"regex": "(["}})
    assert response.status_code == 400 and "regex" in response.json()["error"]["message"]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


# -- many clients at once --------------------------------------------------------------

def test_64_concurrent_streaming_greedy_clients_get_the_offline_outputs(server, offline):
    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in stream])

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY) as client:
            return await asyncio.gather(*[one(client, p) for p in PROMPTS])

    assert asyncio.run(all_clients()) == offline * 16


def test_a_client_leaving_mid_stream_aborts_its_request_and_frees_its_blocks(server):
    url = server
    aborted = metrics(url)["requests_aborted_total"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as response:
        events = response.iter_lines()
        assert next(events).startswith("data: ")  # generating
    deadline = time.monotonic() + 10
    while (m := metrics(url))["requests_aborted_total"] == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["requests_aborted_total"] == aborted + 1
    assert wait_until_idle(url)["kv_cache_blocks_used"] == 0


def test_a_client_leaving_a_call_that_does_not_stream_aborts_its_requests_and_frees_their_blocks(server):
    aborted = metrics(server)["requests_aborted_total"]
    # 32 prompts of 8 completions each: more than the KV cache holds at once, so many seconds of work
    body = {"model": MODEL, "prompt": [PROMPTS[0]] * 32, "n": 8, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=0.5)
    deadline = time.monotonic() + 10
    while (m := metrics(server))["requests_aborted_total"] == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted < m["requests_aborted_total"] <= aborted + 32  # the first few may have finished
    assert wait_until_idle(server)["kv_cache_blocks_used"] == 0

def test_deltas_queued_together_join_into_one_output():
    def delta(text, token_ids, finish_reason=None):
        completions = [CompletionOutput(i, text, token_ids, None, [{t: None} for t in token_ids], finish_reason,
                                        None, [1] * len(token_ids)) for i in range(2)]
        return RequestOutput("r", None, [1, 2], None, completions, finish_reason is not None,
                             RequestMetrics(0.0, None, None))

    joined = joined_deltas([delta("a", [5]), delta("bc", [6, 7]), delta("d", [8], "length")])
    assert joined.finished and [c.index for c in joined.outputs] == [0, 1]
    assert all(c.text == "abcd" and c.token_ids == [5, 6, 7, 8] and len(c.logprobs) == len(c.token_masks) == 4
               and c.finish_reason == "length" for c in joined.outputs)


def test_a_stream_joined_keeps_the_prompt_logprobs_only_its_first_output_carried():
    def delta(prompt_logprobs, finished):
        return RequestOutput("r", None, [1, 2], prompt_logprobs, [CompletionOutput(0, "a", [5], None, None, None)],
                             finished, RequestMetrics(0.0, None, None))

    entries = [None, {2: Logprob(-0.5, 1, "x")}]
    assert joined_deltas([delta(entries, False), delta(None, True)]).prompt_logprobs == entries


def test_a_streams_later_outputs_cross_the_pipe_without_the_prompt_logprobs(llm):
    output = llm.generate(["ROMEO:"], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)[0]
    assert unpacked(packed(output, with_prompt_logprobs=False), output.prompt_token_ids).prompt_logprobs is None
    assert unpacked(packed(output), output.prompt_token_ids).prompt_logprobs == output.prompt_logprobs



def test_an_output_crosses_the_pipe_whole_but_for_the_prompt_text(llm):
    output = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=4, logprobs=2, n=2, seed=1),
                          use_tqdm=False)[0]
    assert unpacked(pickle.loads(pickle.dumps(packed(output))), output.prompt_token_ids) == replace(output, prompt=None)

# -- bad requests ------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": "high"}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),    # past the model's 256 tokens
    ({"prompt": "x", "n": 9}, "n"),                         # past the server's max_n
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "suffix": "!"}, "suffix"),
    ({"prompt": [3.5]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "structured_outputs": {"regexp": "a"}}, "structured_outputs"),
    ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
     "response_format.json_schema.schema"),
])
def test_a_bad_field_gets_a_400_naming_it(server, body, param):
    response = httpx.post(server + "/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == 400 and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [
    "hi", [{"role": "user"}], [{"role": "assistant", "content": "hi"}], [{"role": "user", "content": 3}]])
def test_a_bad_conversation_gets_a_400(server, messages):
    response = httpx.post(server + "/v1/chat/completions", json={"messages": messages}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_gets_a_400_and_the_server_carries_on(server, client, content):
    response = httpx.post(server + "/v1/completions", content=content, headers=AUTH)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices[0].finish_reason


def test_a_body_over_the_size_limit_gets_a_413(server):
    response = httpx.post(server + "/v1/completions", json={"prompt": "x" * (1 << 17)}, headers=AUTH)
    assert response.status_code == 413


def test_a_wrong_or_missing_api_key_gets_a_401_but_health_and_metrics_need_none(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong").models.list()
    response = httpx.post(server + "/v1/completions", json={"prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/health").status_code == httpx.get(server + "/metrics").status_code == 200


def test_another_model_name_gets_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_the_load_benchmark_clients_count_every_streamed_token(llm_args):
    from benchmarks.serve_load import run_clients
    from benchmarks.workloads import BenchRequest
    requests = [BenchRequest([1, 2, 3 + i], 5 + i) for i in range(6)]
    with serving(llm_args, api_key=None) as url:
        records, _ = asyncio.run(run_clients(url, MODEL, requests, rate=float("inf"), seed=0))
    assert [r.completion_tokens for r in records] == [r.max_tokens for r in requests]
    assert all(1 <= len(r.chunk_times) <= q.max_tokens for r, q in zip(records, requests))


# -- limits ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited_server(make_checkpoint):
    """Room for one sequence, and a time limit far shorter than a 1000-token completion."""
    args = {"model": str(make_checkpoint(seq_len=1024)), "num_blocks": 128, "block_size": 16}
    with serving(args, max_seqs_in_flight=1, request_timeout_s=0.3) as url:
        yield url


def test_a_full_queue_answers_503_with_retry_after(limited_server):
    async def burst():
        async with httpx.AsyncClient(base_url=limited_server, timeout=30, headers=AUTH) as http:
            body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}
            return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(8)])

    responses = asyncio.run(burst())  # one holds the only seat while the others arrive
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" for r in busy)
    assert {r.status_code for r in responses} <= {200, 503, 504}


def test_a_request_past_the_time_limit_gets_a_504_and_is_aborted(limited_server):
    aborted = metrics(limited_server)["requests_aborted_total"]
    response = httpx.post(limited_server + "/v1/completions", timeout=30, headers=AUTH,
                          json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True})
    assert response.status_code == 504 and "limit" in response.json()["error"]["message"]
    assert metrics(limited_server)["requests_aborted_total"] == aborted + 1
    assert wait_until_idle(limited_server)["kv_cache_blocks_used"] == 0


def wait_until_idle(url: str) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while (m := metrics(url))["num_requests_running"] + m["num_requests_waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["num_requests_running"] == m["num_requests_waiting"] == 0
    return m


# -- the command line --------------------------------------------------------------------

@pytest.mark.slow  # starts a Python subprocess
def test_the_command_serves_with_the_key_from_the_environment(checkpoint_dir):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MICROVLLM_API_KEY": "sesame"}
    process = subprocess.Popen([sys.executable, "-m", "microvllm.serve", str(checkpoint_dir), "--port", str(port),
                                "--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, process)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        reply = openai.OpenAI(base_url=url + "/v1", api_key="sesame").completions.create(
            model=MODEL, prompt="x", max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_without_the_serve_extra_the_error_names_the_install_command():
    hide_fastapi = "import sys; sys.modules['fastapi'] = None; import microvllm.serve"
    result = subprocess.run([sys.executable, "-c", hide_fastapi], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode != 0
    assert 'pip install -e ".[serve]"' in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health").status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"no server at {url}")
