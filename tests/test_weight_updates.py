"""RL weight refresh: update_weights(B) serves exactly what a fresh LLM on B serves, in place."""

import itertools

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.cpu.linear import PackedLinear, packs_linears
from microvllm.model.loader import find_checkpoint, load_model, read_state_dict
from microvllm.model.quantization import Fp8Linear, Int8Linear

# two full blocks of 16 and a tail: a second run of a prompt hits the prefix cache
PROMPTS = [{"prompt_token_ids": [(7 * i + 3) % 256 for i in range(40)]},
           {"prompt_token_ids": [(5 * i + 11) % 256 for i in range(23)]}, "hello there"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
ENGINE = dict(num_blocks=32)
CONFIGS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
           "int8": dict(dtype="float32", quantization="int8"),
           "int8-bfloat16": dict(dtype="bfloat16", quantization="int8")}


def state_dict_of(checkpoint_dir) -> dict[str, torch.Tensor]:
    return read_state_dict(find_checkpoint(checkpoint_dir)[0])


def served(llm: LLM) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and their log-probs."""
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [(c.token_ids, [row[t].logprob for t, row in zip(c.token_ids, c.logprobs)])
            for c in (o.outputs[0] for o in outputs)]


@pytest.fixture(scope="module")
def checkpoint_b(make_checkpoint):
    return make_checkpoint(seed=1)


@pytest.fixture(scope="module")
def state_b(checkpoint_b):
    return state_dict_of(checkpoint_b)


@pytest.fixture(scope="module")
def expected_b(checkpoint_b):
    return {name: served(LLM(checkpoint_b, **ENGINE, **config)) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    """A float32 engine on checkpoint A, for the tests that leave its weights unchanged."""
    return LLM(checkpoint_dir, **ENGINE, dtype="float32")


@pytest.mark.parametrize("config", CONFIGS)
def test_updated_engine_serves_what_a_fresh_one_on_the_new_weights_serves(config, checkpoint_dir, state_b,
                                                                          expected_b):
    llm = LLM(checkpoint_dir, **ENGINE, **CONFIGS[config])
    before = served(llm)
    llm.update_weights(state_b)
    after = served(llm)
    assert after == expected_b[config]
    assert after != before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_packed_linears_repacks_them(checkpoint_dir, state_b, expected_b, dtype):
    if not packs_linears(getattr(torch, dtype)):
        pytest.skip(f"this CPU runs {dtype} linears unpacked")
    llm = LLM(checkpoint_dir, **ENGINE, dtype=dtype)
    assert any(isinstance(m, PackedLinear) for m in llm.engine.model.modules())
    llm.update_weights(state_b)
    assert served(llm) == expected_b[dtype]


def test_int8_engine_requantizes(checkpoint_dir, state_b, expected_b):
    llm = LLM(checkpoint_dir, **ENGINE, dtype="float32", quantization="int8")
    layer = next(m for m in llm.engine.model.modules() if isinstance(m, Int8Linear))
    old_weight = layer.weight.clone()
    llm.update_weights(state_b)
    assert layer.weight.dtype == torch.int8 and not torch.equal(layer.weight, old_weight)
    assert served(llm) == expected_b["int8"]


@pytest.mark.parametrize("twin", [Int8Linear, Fp8Linear])
def test_a_quantized_linear_loads_a_new_weight_into_its_own_buffers(twin):
    # fp8's forward needs a GPU; its load_weight runs anywhere
    linear, new = (torch.nn.Linear(32, 48, bias=False) for _ in range(2))
    layer = twin(linear)
    addresses = [b.data_ptr() for b in layer.buffers()]
    layer.load_weight(new.weight.detach())
    fresh = twin(new)
    assert all(torch.equal(got.float(), want.float()) for got, want in zip(layer.buffers(), fresh.buffers()))
    assert [b.data_ptr() for b in layer.buffers()] == addresses


def test_a_module_and_compiled_prefixed_keys_are_accepted(checkpoint_dir, checkpoint_b, state_b, expected_b):
    llm = LLM(checkpoint_dir, **ENGINE, dtype="float32")
    llm.update_weights(load_model(checkpoint_b))
    assert served(llm) == expected_b["float32"]
    llm.update_weights(state_dict_of(checkpoint_dir))
    llm.update_weights({"_orig_mod." + k: v for k, v in state_b.items()})
    assert served(llm) == expected_b["float32"]


def test_weights_in_another_dtype_are_cast_to_the_engines(checkpoint_dir, state_b, expected_b):
    llm = LLM(checkpoint_dir, **ENGINE, dtype="bfloat16")
    llm.update_weights({k: v.to(torch.bfloat16) for k, v in state_b.items()})
    assert served(llm) == expected_b["bfloat16"]


def test_update_resets_the_prefix_cache(checkpoint_dir, state_b, expected_b):
    llm = LLM(checkpoint_dir, **ENGINE, dtype="float32")
    served(llm)
    again = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32  # the cache would serve the old weights' KV
    llm.update_weights(state_b)
    assert llm.engine.block_manager.cached_block_by_hash == {}
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 0]
    assert served(llm) == expected_b["float32"]


def test_reset_prefix_cache_forgets_cached_prompts(llm):
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache() is True
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_reset_prefix_cache_keeps_running_requests_whole(llm):
    expected = served(llm)
    llm.add_request(PROMPTS[0], GREEDY, request_id="running")
    llm.step()  # prefilled: its full blocks are cached and held
    assert llm.reset_prefix_cache() is True
    llm.engine.block_manager.check_invariants([s.block_table for s in llm.engine.scheduler.running])
    outputs = []
    while llm.has_unfinished_requests():
        outputs += llm.step()
    (output,) = outputs
    assert output.outputs[0].token_ids == expected[0][0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("config", ["float32", "bfloat16", "int8"])
def test_fifty_updates_keep_memory_flat(config, make_checkpoint):
    # a model wide enough that a leaked copy per update would show in RSS
    shape = dict(n_layer=2, n_embd=256, n_head=4, n_kv_head=2)
    a, b = (state_dict_of(make_checkpoint(seed=seed, **shape)) for seed in (2, 3))
    llm = LLM(make_checkpoint(seed=2, **shape), **ENGINE, **CONFIGS[config])
    model = llm.engine.model
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if not t.is_mkldnn]
    addresses = [t.data_ptr() for t in tensors]
    model_bytes = sum(v.numel() * v.element_size() for v in a.values())
    llm.update_weights(b)  # the first update's allocator warm-up
    start = rss_bytes()
    for i in range(50):
        llm.update_weights(a if i % 2 else b)
    assert [t.data_ptr() for t in tensors] == addresses
    assert rss_bytes() - start < 4 * model_bytes  # fifty leaked copies would be 50x


BAD_STATE_DICTS = {
    "missing key": lambda sd, key: {k: v for k, v in sd.items() if k != key},
    "unexpected key": lambda sd, key: {**sd, "transformer.h.0.attn.c_z.weight": sd[key]},
    "wrong shape": lambda sd, key: {**sd, key: sd[key][..., :-1]},
    "int dtype": lambda sd, key: {**sd, key: sd[key].long()},
    "meta tensor": lambda sd, key: {**sd, key: sd[key].to("meta")},
}


@pytest.mark.parametrize("mismatch", BAD_STATE_DICTS)
def test_a_mismatched_state_dict_is_refused_and_the_old_weights_still_serve(mismatch, llm, state_b):
    before = served(llm)
    key = list(state_b)[-1]  # the last key: every other one fits, and would be written first
    bad = BAD_STATE_DICTS[mismatch](state_b, key)
    named = "transformer.h.0.attn.c_z.weight" if mismatch == "unexpected key" else key
    with pytest.raises(ValueError, match=named.replace(".", r"\.")) as error:
        llm.update_weights(bad)
    if mismatch == "wrong shape":
        assert str(tuple(state_b[key].shape)) in str(error.value)
    assert served(llm) == before


def test_update_with_an_unfinished_request_is_refused(llm, state_b):
    before = served(llm)
    llm.add_request(PROMPTS[0], GREEDY, request_id="unfinished")
    with pytest.raises(ValueError, match="finish or abort the 1 unfinished"):
        llm.update_weights(state_b)
    llm.abort("unfinished")
    llm.step()
    assert served(llm) == before


def assert_close(got, expected):
    """Same tokens; log-probs to float32 rounding, since a replica's batches differ in shape."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_logprobs), (_, expected_logprobs) in zip(got, expected):
        assert got_logprobs == pytest.approx(expected_logprobs, abs=1e-5)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_every_replica_gets_the_new_weights(local_ray, checkpoint_dir, state_b, expected_b):
    # replicas run outside conftest's float32 default: float32 by name
    pool_llm = LLM(checkpoint_dir, data_parallel_size=2, cpu_threads_per_replica=1, **ENGINE, dtype="float32")
    try:
        served(pool_llm)
        served(pool_llm)
        assert pool_llm.engine._cached_prefixes
        pool_llm.update_weights(state_b)
        assert not pool_llm.engine._cached_prefixes and not pool_llm.engine._warming_prefixes
        assert_close(served(pool_llm), expected_b["float32"])
        with pytest.raises(ValueError, match="missing keys"):
            pool_llm.update_weights({k: v for k, v in state_b.items() if k != "lm_head.weight"})
        assert_close(served(pool_llm), expected_b["float32"])
        assert pool_llm.reset_prefix_cache() is True
    finally:
        pool_llm.engine.shutdown()
