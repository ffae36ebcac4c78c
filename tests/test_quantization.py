"""Quantized weights: round-trip bounds, outputs close to full precision, bad values refused."""

import pytest
import torch
import torch.nn as nn

from microvllm import LLM, SamplingParams
from microvllm.model.attention import DenseCausalAttention
from microvllm.model.loader import load_model
from microvllm.model.quantization import (FP8_MAX, Fp8Linear, Int8Linear, check_fp8_supported, dequantize,
                                          quantize_fp8, quantize_int8, quantize_linears)


def weights(seed=0):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
    w[3] = 0.0          # an all-zero row must not divide by zero
    w[5, 7] = 40.0      # an outlier stretches only its own row's scale
    return w


def test_int8_round_trip_is_within_half_a_step():
    w = weights()
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all((w - dequantize(q, scales)).abs() <= scales[:, None] / 2 + 1e-6)
    assert torch.equal(dequantize(q, scales)[3], torch.zeros(64))
    # the row's largest magnitude is represented exactly
    assert torch.allclose(dequantize(q, scales).abs().amax(1), w.abs().amax(1))


def test_fp8_round_trip_is_within_e4m3_rounding():
    w = weights()
    q, scales = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    scaled = w / scales[:, None]
    assert q.float().abs().max() == FP8_MAX
    # 3 mantissa bits: half a step is |x|/16 for normal numbers, 2^-10 below 2^-6
    bound = torch.maximum(scaled.abs() / 16, torch.full_like(scaled, 2.0**-10)) * scales[:, None]
    assert torch.all((w - dequantize(q, scales)).abs() <= bound + 1e-7)
    assert torch.equal(dequantize(q, scales)[3], torch.zeros(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 12])  # 12: a width torch's int8 CPU kernel cannot take
def test_int8_linear_equals_the_dequantized_matmul(dtype, in_features):
    linear = nn.Linear(in_features, 48, bias=False).requires_grad_(False)
    linear.weight.copy_(weights()[:, :in_features])
    linear = linear.to(dtype)
    quantized = Int8Linear(linear)
    x = torch.randn(2, 5, in_features).to(dtype)
    want = x.float() @ dequantize(quantized.weight, quantized.scales).T
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(quantized(x).float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_fp8_linear_matches_a_reference_matmul_of_quantized_operands():
    # torch._scaled_mm has a CPU implementation, so the fp8 math is checked here;
    # the engine itself only runs fp8 on GPUs with fp8 tensor cores
    linear = nn.Linear(64, 48, bias=False).requires_grad_(False)
    linear.weight.copy_(weights())
    quantized = Fp8Linear(linear)
    x = torch.randn(7, 64)
    xq, x_scales = quantize_fp8(x)
    want = dequantize(xq, x_scales) @ dequantize(quantized.weight, quantized.scales[0]).T
    torch.testing.assert_close(quantized(x), want, rtol=1e-4, atol=1e-4)
    assert (quantized(x) - linear(x)).abs().max() < 0.1 * linear(x).abs().max()


def test_every_linear_is_swapped_and_embeddings_are_kept(checkpoint_dir):
    model = quantize_linears(load_model(checkpoint_dir), "int8")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert model.transformer.wte.weight.dtype == torch.float32


def test_any_module_tree_of_linears_is_swapped():
    # fused or extra projections are found by walking the modules, not by name
    model = nn.Sequential(nn.Linear(32, 96, bias=False), nn.ModuleDict({"x": nn.Linear(96, 32, bias=False)}))
    quantize_linears(model, "int8")
    assert isinstance(model[0], Int8Linear) and isinstance(model[1]["x"], Int8Linear)


def logits(model, tokens):
    ids = torch.tensor(tokens)
    prev = torch.cat([torch.tensor([-1]), ids[:-1]])
    return model.compute_logits(model(ids, torch.arange(len(ids)), prev, DenseCausalAttention(1)))


@pytest.mark.parametrize("era", ["A", "B", "C", "D", "E"])
def test_int8_logits_are_close_to_unquantized(make_checkpoint, era):
    directory = make_checkpoint(era=era, seed=3)
    tokens = [(11 * i + 5) % 256 for i in range(48)]
    want = logits(load_model(directory), tokens)
    got = logits(quantize_linears(load_model(directory), "int8"), tokens)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_int8_engine_generates_like_unquantized(checkpoint_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompt = [[(3 * i + 1) % 256 for i in range(20)]]
    want = LLM(checkpoint_dir).generate(prompt, params, use_tqdm=False)[0].outputs[0]
    got = LLM(checkpoint_dir, quantization="int8").generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(got.token_ids) == 12
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, rel=0.05)


def test_unknown_quantization_names_the_supported_ones(checkpoint_dir):
    with pytest.raises(ValueError, match=r"quantization='int4' is not one of 'int8', 'fp8', None"):
        LLM(checkpoint_dir, quantization="int4")


def test_fp8_on_cpu_says_what_it_needs(checkpoint_dir):
    with pytest.raises(ValueError, match=r"fp8.*compute capability 8.9.*runs on cpu"):
        LLM(checkpoint_dir, device="cpu", quantization="fp8")


def test_fp8_on_an_older_gpu_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability 8.9.*NVIDIA A100 is 8.0"):
        check_fp8_supported(torch.device("cuda"))
