"""microvllm's C kernels: built once and cached, and the fused norm/rotary ops compute
what the model's torch ops compute."""

import logging
import subprocess

import pytest
import torch

from microvllm import LLM
from microvllm.cpu import kernels as cpu_kernels
from microvllm.cpu.kernels import load_library
from microvllm.cpu.linear import PackedLinear, native_bfloat16, packs_linears
from microvllm.cpu.ops import CpuOps
from microvllm.platform import cpu as platform_cpu
from microvllm.model.gpt import TorchOps

if load_library() is None:
    pytest.skip("no C compiler to build the CPU kernels", allow_module_level=True)

# float32: one pass in float32 against torch's op-by-op float32; bfloat16: rounded once at
# the end against torch's rounding after every op
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-2, rtol=2e-2)}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCES))


def test_a_failing_build_warns_with_the_compiler_output_and_falls_back(fresh_kernel_cache, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-no-such-flag"))
    with caplog.at_level(logging.WARNING, logger="microvllm.cpu.kernels"):
        assert load_library() is None
    assert "building microvllm's CPU kernels failed" in caplog.text
    assert "-no-such-flag" in caplog.text


@pytest.mark.slow  # compiles the kernel into an empty cache
def test_a_built_library_is_reused_from_the_cache(fresh_kernel_cache, monkeypatch):
    assert load_library() is not None
    assert len(list(fresh_kernel_cache.glob("cpu_kernels_*.so"))) == 1
    load_library.cache_clear()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached library"))
    assert load_library() is not None


@DTYPES
@pytest.mark.parametrize("shape", [(1, 384), (37, 64), (3, 5, 48), (2, 7)])
def test_rms_norm_matches_torch(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    torch.testing.assert_close(CpuOps.rms_norm(x), TorchOps.rms_norm(x), **TOLERANCES[dtype])


@DTYPES
def test_rms_norm_reads_rows_of_a_wider_tensor(dtype):
    wide = torch.randn(9, 100).to(dtype)
    x = wide[:, 10:74]  # rows 100 elements apart
    torch.testing.assert_close(CpuOps.rms_norm(x), TorchOps.rms_norm(x), **TOLERANCES[dtype])


@DTYPES
@pytest.mark.parametrize("heads, head_dim, scale", [(6, 64, 1.0), (2, 128, 1.2), (3, 10, 0.5)])
def test_rotary_norm_matches_torch(dtype, heads, head_dim, scale):
    positions_seen, n = 50, 13
    angles = torch.rand(positions_seen, head_dim // 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.randint(0, positions_seen, (n,))
    x = torch.randn(n, heads * head_dim).to(dtype)
    got = CpuOps.rotary_norm(cos, sin, positions)(x, heads, scale)
    want = TorchOps.rotary_norm(cos, sin, positions)(x, heads, scale)
    assert got.shape == want.shape == (n, heads, head_dim)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_rotary_norm_reads_a_slice_of_a_wider_projection():
    angles = torch.rand(8, 8)
    cos, sin, positions = angles.cos(), angles.sin(), torch.arange(5)
    x = torch.randn(5, 3 * 32)[:, 32:64]  # one head of a wider row
    torch.testing.assert_close(CpuOps.rotary_norm(cos, sin, positions)(x, 2, 1.0),
                               TorchOps.rotary_norm(cos, sin, positions)(x, 2, 1.0))


@pytest.mark.parametrize("backend, ops", [("cpu", CpuOps), ("sdpa", TorchOps)])
def test_the_cpu_backend_brings_the_fused_ops(checkpoint_dir, backend, ops):
    assert LLM(checkpoint_dir, attention_backend=backend).engine.model.ops is ops


@pytest.mark.skipif(not native_bfloat16(), reason="packing is for CPUs with native bfloat16")
@pytest.mark.parametrize("rows", [1, 7, 64, 256, 300, 600])  # padded rows or not
def test_packed_bfloat16_linear_gives_what_linear_gives(rows):
    linear = torch.nn.Linear(96, 160, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    assert torch.equal(PackedLinear(linear)(x), linear(x))


@pytest.mark.skipif(not packs_linears(torch.float32), reason="torch is built without oneDNN")
@pytest.mark.parametrize("rows", [1, 7, 64, 256, 300, 600])
def test_packed_float32_linear_gives_what_linear_gives_to_float32_rounding(rows):
    linear = torch.nn.Linear(96, 160, bias=False)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x), **TOLERANCES[torch.float32])


@pytest.mark.skipif(not packs_linears(torch.float32), reason="torch is built without oneDNN")
def test_a_packed_float32_row_has_the_same_bits_whatever_rows_run_beside_it():
    # 1,536 inputs: a shape whose one-row product, unpadded, rounds differently
    linear = PackedLinear(torch.nn.Linear(1536, 384, bias=False))
    x = torch.randn(300, 1536)
    alone = linear(x[:1])
    assert all(torch.equal(linear(x[:rows])[:1], alone) for rows in range(2, 301))


@pytest.mark.skipif(not native_bfloat16(), reason="packing is for CPUs with native bfloat16")
def test_bfloat16_engines_pack_their_linears(checkpoint_dir):
    assert isinstance(LLM(checkpoint_dir, dtype="bfloat16").engine.model.lm_head, PackedLinear)


@pytest.mark.skipif(not packs_linears(torch.float32), reason="torch is built without oneDNN")
def test_float32_engines_pack_their_linears_and_quantized_ones_keep_theirs(checkpoint_dir):
    assert isinstance(LLM(checkpoint_dir, dtype="float32").engine.model.lm_head, PackedLinear)
    quantized = LLM(checkpoint_dir, dtype="float32", quantization="int8").engine.model
    assert not any(isinstance(m, PackedLinear) for m in quantized.modules())


def test_the_cpu_default_dtype_is_bfloat16_only_where_the_cpu_has_bfloat16_instructions(monkeypatch):
    from microvllm.engine import config
    want = torch.bfloat16 if native_bfloat16() else torch.float32
    default = platform_cpu.default_cpu_dtype()  # what CpuPlatform.default_dtype gives outside the tests
    assert default is want
    assert config.EngineConfig(model="m").resolve_dtype(default) is want
    assert config.EngineConfig(model="m", dtype="float32").resolve_dtype(default) is torch.float32


@DTYPES
def test_relu_squared_is_torchs_bit_for_bit_in_place(dtype):
    x = torch.randn(37, 1536).to(dtype)
    want = TorchOps.relu_squared_(x.clone())
    data = x.data_ptr()
    got = CpuOps.relu_squared_(x)
    assert torch.equal(got, want) and got.data_ptr() == data
