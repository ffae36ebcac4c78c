"""Property tests at the API boundary: valid settings work, invalid ones get a typed
error (TypeError for the wrong type, ValueError out of range) that names the field."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvllm import LLM, SamplingParams
from microvllm.engine.config import EngineConfig

pytestmark = pytest.mark.slow  # many hypothesis examples, some through an engine

# a shared machine can stall any draw: no deadlines or speed health checks
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# each SamplingParams field: values it accepts, values of the right type it refuses
# (ValueError, None where there are none), and values of the wrong type (TypeError)
finite = st.floats(allow_nan=False, allow_infinity=False)
# the *_OR_NONE strategies are for settings where None is allowed
NOT_A_NUMBER_OR_NONE = st.one_of(st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2))
NOT_A_NUMBER = st.one_of(NOT_A_NUMBER_OR_NONE, st.none())
NOT_AN_INT_OR_NONE = st.one_of(NOT_A_NUMBER_OR_NONE, st.floats())
NOT_AN_INT = st.one_of(NOT_AN_INT_OR_NONE, st.none())
NOT_A_BOOL = st.one_of(st.integers(), st.text(max_size=3), st.none())
SAMPLING_FIELDS = {
    "n": (st.integers(1, 4), st.integers(max_value=0), NOT_AN_INT),
    "temperature": (st.floats(0, 5), st.one_of(st.floats(max_value=-1e-9), st.just(math.nan),
                                               st.just(math.inf)), NOT_A_NUMBER),
    "top_p": (st.floats(1e-3, 1), st.one_of(st.floats(max_value=0), st.floats(min_value=1.001)), NOT_A_NUMBER),
    "top_k": (st.integers(-1, 2000), st.integers(max_value=-2), NOT_AN_INT),
    "min_p": (st.floats(0, 1), st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.001)), NOT_A_NUMBER),
    "repetition_penalty": (st.floats(0.5, 2), st.floats(max_value=0), NOT_A_NUMBER),
    "presence_penalty": (st.floats(-2, 2), st.floats(min_value=2.001), NOT_A_NUMBER),
    "frequency_penalty": (st.floats(-2, 2), st.floats(max_value=-2.001), NOT_A_NUMBER),
    "logprobs": (st.one_of(st.none(), st.integers(0, 20)), st.integers(min_value=21), NOT_AN_INT_OR_NONE),
    "prompt_logprobs": (st.one_of(st.none(), st.integers(0, 5)), st.integers(max_value=-1),
                        NOT_AN_INT_OR_NONE),
    "seed": (st.one_of(st.none(), st.integers()), None, NOT_AN_INT_OR_NONE),
    "stop": (st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3),
                                                                             max_size=3)),
             st.one_of(st.just(""), st.just(["a", ""])), st.one_of(st.integers(), st.lists(st.integers(),
                                                                                            min_size=1))),
    "stop_token_ids": (st.one_of(st.none(), st.lists(st.integers(0, 264), max_size=3)),
                       st.lists(st.integers(max_value=-1), min_size=1), st.one_of(st.integers(), st.text(max_size=2))),
    "ignore_eos": (st.booleans(), None, NOT_A_BOOL),
    "include_stop_str_in_output": (st.booleans(), None, NOT_A_BOOL),
    "skip_special_tokens": (st.booleans(), None, NOT_A_BOOL),
}


def refusals(out_of_range, wrong_type) -> list:
    """(error, strategy) pairs; a field whose type admits no out-of-range value has None."""
    return [(e, s) for e, s in ((ValueError, out_of_range), (TypeError, wrong_type)) if s is not None]


@st.composite
def valid_sampling_kwargs(draw):
    kwargs = {name: draw(valid) for name, (valid, _, _) in SAMPLING_FIELDS.items() if draw(st.booleans())}
    max_tokens = draw(st.integers(1, 8))
    return dict(kwargs, max_tokens=max_tokens, min_tokens=draw(st.integers(0, max_tokens)))


@st.composite
def invalid_sampling_kwargs(draw):
    name = draw(st.sampled_from(sorted(SAMPLING_FIELDS)))
    _, out_of_range, wrong_type = SAMPLING_FIELDS[name]
    error, strategy = draw(st.sampled_from(refusals(out_of_range, wrong_type)))
    return name, draw(strategy), error


@QUICK
@given(valid_sampling_kwargs())
def test_valid_sampling_params_are_accepted_and_normalised(kwargs):
    p = SamplingParams(**kwargs)
    assert isinstance(p.stop_strings, tuple) and all(isinstance(s, str) for s in p.stop_strings)
    assert isinstance(p.stop_token_ids, list)
    assert p.greedy == (p.temperature < 1e-5)


@QUICK
@given(invalid_sampling_kwargs())
def test_invalid_sampling_params_name_the_field(case):
    name, value, error = case
    with pytest.raises(error, match=name):
        SamplingParams(**{name: value})


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir)


@settings(QUICK, max_examples=25)
@given(valid_sampling_kwargs(), st.lists(st.integers(0, 264), min_size=1, max_size=12))
def test_valid_sampling_params_give_well_formed_outputs(llm, kwargs, prompt):
    p = SamplingParams(**kwargs)
    (out,) = llm.generate([prompt], p, use_tqdm=False)
    assert len(out.outputs) == p.n
    for c in out.outputs:
        assert len(c.token_ids) <= p.max_tokens and c.finish_reason in ("stop", "length")
        # nothing ends a completion before min_tokens tokens
        assert len(c.token_ids) >= p.min_tokens
        assert all(0 <= t < llm.engine.vocab_size for t in c.token_ids)
        if p.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
            assert all(len(entry) >= min(p.logprobs, 1) and math.isfinite(entry[t].logprob)
                       for entry, t in zip(c.logprobs, c.token_ids))
    if p.prompt_logprobs is not None:
        assert len(out.prompt_logprobs) == len(prompt)
    assert llm.engine.block_manager.num_used_blocks == 0


# EngineConfig settings that are checked before anything is loaded
NOT_A_STR = st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=1))
ENGINE_FIELDS = {
    "step": (st.integers(max_value=-1), NOT_AN_INT_OR_NONE),
    "block_size": (st.one_of(st.integers(max_value=0), st.sampled_from([3, 12, 100])),
                   NOT_AN_INT_OR_NONE),
    "num_blocks": (st.integers(max_value=0), NOT_AN_INT_OR_NONE),
    "kv_cache_memory": (st.one_of(st.floats(max_value=0.99), st.just(math.inf), st.just(math.nan)),
                        NOT_A_NUMBER_OR_NONE),
    "gpu_memory_utilization": (st.one_of(st.floats(max_value=0), st.floats(min_value=1.001)), NOT_A_NUMBER),
    "max_num_seqs": (st.integers(max_value=0), NOT_AN_INT_OR_NONE),  # None: vLLM's "the default"
    "max_num_batched_tokens": (st.integers(max_value=0), NOT_AN_INT),
    "max_model_len": (st.integers(max_value=1), NOT_AN_INT_OR_NONE),
    "enable_prefix_caching": (None, NOT_A_BOOL),
    "enforce_eager": (None, NOT_A_BOOL),
    "logit_softcap": (st.one_of(st.floats(max_value=0), st.just(math.nan)),
                      NOT_A_NUMBER_OR_NONE),
    "seed": (None, NOT_AN_INT),
    "device": (None, st.one_of(st.integers(), st.floats())),
    "dtype": (None, st.one_of(st.integers(), st.floats())),
    "attention_backend": (None, NOT_A_STR),
}


@QUICK
@given(st.sampled_from(sorted(ENGINE_FIELDS)), st.data())
def test_invalid_engine_settings_name_the_field(name, data):
    error, strategy = data.draw(st.sampled_from(refusals(*ENGINE_FIELDS[name])))
    value = data.draw(strategy)
    with pytest.raises(error, match=name):
        EngineConfig(model="unused", **{name: value})


@QUICK
@given(st.fixed_dictionaries({}, optional={
    "block_size": st.sampled_from([1, 8, 16, 64]), "num_blocks": st.integers(1, 10**6),
    "kv_cache_memory": st.floats(1, 2**40), "gpu_memory_utilization": st.floats(0.01, 1),
    "max_num_seqs": st.integers(1, 1024), "max_num_batched_tokens": st.integers(1, 10**5),
    "max_model_len": st.one_of(st.none(), st.integers(2, 10**5)), "enable_prefix_caching": st.booleans(),
    "enforce_eager": st.booleans(), "logit_softcap": st.one_of(st.none(), st.floats(0.5, 50)),
    "seed": st.integers(), "step": st.one_of(st.none(), st.integers(0, 10**6)),
    "attention_backend": st.sampled_from(["auto", "sdpa", "cpu", "flash_attn", "triton"]),
    "dtype": st.sampled_from([None, "auto", "float32", "bfloat16", "float16"]),
}))
def test_valid_engine_settings_are_accepted(kwargs):
    config = EngineConfig(model="unused", **kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == (int(value) if name == "kv_cache_memory" else value)
