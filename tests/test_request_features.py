"""Request features: what a request asks for beyond plain sampling becomes objects in
one per-request list, which a plain request does not have and whose hooks a step calls
only where a feature overrides them."""

import pytest

from microvllm import LLM, RequestOutputKind, SamplingParams
from microvllm.engine import model_runner
from microvllm.engine.features import EVERY_TOKEN
from microvllm.engine.logprobs import SampledLogprobs
from microvllm.engine.stop_strings import StopStrings
from microvllm.engine.stream_deltas import StreamDeltas
from microvllm.engine.tool_use import ToolUse

PLAIN = dict(temperature=0, max_tokens=4, ignore_eos=True, tools=None)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return LLM(checkpoint_dir).engine


def added(engine, params: SamplingParams, output_kind=RequestOutputKind.FINAL_ONLY):
    request_id = engine.add_request(None, [1, 2, 3], params, output_kind=output_kind)
    request = engine.output_processor.requests[request_id]
    engine.abort_request(request_id)
    return request


def test_a_plain_request_has_no_features_and_no_wake_tokens(engine):
    request = added(engine, SamplingParams(**PLAIN))
    assert request.features is None
    assert not request.sequences[0].wake_tokens


def test_each_asked_for_feature_is_one_object_in_the_request_list(engine):
    params = SamplingParams(**dict(PLAIN, tools="auto"), stop=["x"], logprobs=1)
    request = added(engine, params, RequestOutputKind.DELTA)
    assert [type(f) for f in request.features.items] == [ToolUse, StopStrings, SampledLogprobs, StreamDeltas]


def test_tools_alone_wake_only_on_python_end_with_one_set_shared_by_requests(engine):
    first, second = (added(engine, SamplingParams(**dict(PLAIN, tools="auto"))) for _ in range(2))
    assert first.sequences[0].wake_tokens == {engine.tokenizer.special["<|python_end|>"]}
    assert first.sequences[0].wake_tokens is second.sequences[0].wake_tokens


def test_a_feature_that_needs_every_token_wakes_on_every_token(engine):
    request = added(engine, SamplingParams(**PLAIN, stop=["x"]))
    assert request.sequences[0].wake_tokens is EVERY_TOKEN


def test_a_step_calls_only_the_hooks_a_feature_overrides(engine):
    features = added(engine, SamplingParams(**dict(PLAIN, tools="auto"), logprobs=1), RequestOutputKind.DELTA).features
    assert [type(f) for f in features.forcing] == [ToolUse]
    assert [type(f) for f in features.deciding] == [SampledLogprobs]
    assert [type(f) for f in features.committing] == [ToolUse, SampledLogprobs]
    assert features.stopping == []


def test_only_a_float16_engine_checks_the_activations_for_overflow(checkpoint_dir, monkeypatch):
    def refuse(hidden):
        raise AssertionError("a float32 engine checked for float16 overflow")
    monkeypatch.setattr(model_runner, "check_finite", refuse)
    llm = LLM(checkpoint_dir, dtype="float32")
    assert not llm.engine.runner.checks_overflow
    assert len(llm.generate([[1, 2, 3]], SamplingParams(**PLAIN), use_tqdm=False)[0].outputs[0].token_ids) == 4
    # float16 runs on CUDA; on a CPU it would run as bfloat16, unless kept as here
    monkeypatch.setattr("microvllm.platform.cpu.CpuPlatform.runnable_dtype", lambda self, dtype: dtype)
    assert LLM(checkpoint_dir, dtype="float16").engine.runner.checks_overflow
