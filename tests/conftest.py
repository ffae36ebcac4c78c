import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# the tests' helpers, and the repository root for `benchmarks` and test_alpaca.py
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

import fake_flash_attn  # noqa: E402
from checkpoints import write_checkpoint  # noqa: E402

from microvllm.cpu.threads import apply_cpu_threads  # noqa: E402

# the reference forwards run before any engine is built: give them the engine's thread
# count too ($OMP_NUM_THREADS when set), not torch's one per core, which stalls on a busy machine
apply_cpu_threads(None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes seconds here (Ray clusters, subprocesses of run.py and the benchmark "
        "script, many-example property tests, transformers, Triton's interpreter through whole "
        "engines); `pytest -m \"not slow\" tests` runs the quick core")


# the files whose tests are meant for a real GPU; every other test runs on the CPU
GPU_TEST_FILES = {"test_cuda.py"}


@pytest.fixture(autouse=True)
def cpu_unless_a_gpu_test(request, monkeypatch):
    """On a GPU machine, the CPU-shaped tests (fp32, no graphs, tiny blocks) still see
    no CUDA: engines default to the CPU, here and in subprocesses such as run.py."""
    if request.path.name in GPU_TEST_FILES:
        return
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """An era-E checkpoint (sequence_len 64, windows "SL") with its tokenizer beside it."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "d4")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    def make(**kwargs):
        return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", **kwargs)
    return make


@pytest.fixture
def fake_flash_attn_installed(monkeypatch):
    """`import flash_attn` gives the CPU test double in fake_flash_attn.py for one test."""
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)


@pytest.fixture(scope="session")
def windowed_checkpoint(make_checkpoint):
    # era C, sequence_len 64, "SL": odd layers see the last 32 keys, so long decodes slide
    return make_checkpoint(era="C", window_pattern="SL")


@pytest.fixture
def fresh_kernel_cache(tmp_path, monkeypatch):
    """An empty CPU kernel cache, and load_library forgetting what it found before (and after)."""
    from microvllm.cpu.kernels import load_library
    monkeypatch.setenv("MICROVLLM_CACHE", str(tmp_path / "kernels"))
    load_library.cache_clear()
    yield tmp_path / "kernels"
    load_library.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def float32_by_default():
    """Engines built without a dtype run in float32 here, on every CPU: most tests hold
    the engine to the reference token for token, which only float32 can promise. (On a CPU
    with bfloat16 instructions the real default is bfloat16: test_cpu_kernels.py checks
    that default, and the bfloat16 tests ask for it by name.)"""
    # session-wide, so that module-scoped fixtures' engines see it too
    with pytest.MonkeyPatch.context() as session_patch:
        session_patch.setattr("microvllm.platform.cpu.CpuPlatform.default_dtype", lambda self: torch.float32)
        yield
