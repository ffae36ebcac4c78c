"""A step makes the host wait for the GPU once: when it reads the sampled tokens back.

There is no GPU here, so a torch function mode watches what would stall the host on
CUDA: reading a tensor's values (tolist, item, bool(t), boolean-mask indexing, ...)
and copies from host memory that are not queued behind the GPU's work (torch.tensor
or .to with a device but without non_blocking). Host-to-device copies are counted at
the engine's one packing function. The attention kernels' stand-ins (the flash_attn
double, Triton's interpreter) read their inputs on the host, as a GPU kernel would not,
so the watch pauses inside them.
"""

import importlib
import sys

import pytest
import torch
from helpers import make_prompts, with_decode_graphs
from torch.overrides import TorchFunctionMode

import fake_flash_attn
from microvllm import LLM, SamplingParams
from microvllm.engine import model_runner, sampler
from microvllm.model.attention import AttentionBackend, FlashDecodeAttention, FlashPagedAttention
from microvllm.platform import CpuPlatform

READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
         "masked_select", "unique"}


def _is_device(x) -> bool:
    return isinstance(x, (torch.device, str))


class SyncWatch(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads, self.blocking_copies, self.copies, self.paused = [], [], 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            self._watch(getattr(func, "__name__", str(func)), args, kwargs)
        return func(*args, **kwargs)

    def _watch(self, name, args, kwargs):
        if name in READS:
            self.reads.append(name)
        elif name in ("__getitem__", "__setitem__", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.reads.append(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            self.reads.append("repeat_interleave without output_size")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            self.blocking_copies.append(name)
        elif name == "to" and (kwargs.get("device") is not None or any(_is_device(a) for a in args[1:])):
            if not kwargs.get("non_blocking"):
                self.blocking_copies.append(name)
        elif name == "copy_" and kwargs.get("non_blocking"):
            self.copies += 1  # the graphs' static input buffer

    def pausing(self, fn):
        def paused(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return paused


@pytest.fixture
def watch(monkeypatch, fake_flash_attn_installed):
    w = SyncWatch()
    for module in (model_runner, sampler):
        real = module.to_device

        def counted(*args, real=real, **kwargs):
            w.copies += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, "to_device", counted)
    for name in ("flash_attn_varlen_func", "flash_attn_with_kvcache"):
        monkeypatch.setattr(fake_flash_attn, name, w.pausing(getattr(fake_flash_attn, name)))
    # the sampler's argmax goes through numpy on the CPU only; watch the one CUDA runs
    monkeypatch.setattr(CpuPlatform, "argmax", staticmethod(lambda x: x.argmax(dim=-1)))
    return w


def flash_llm(checkpoint_dir) -> LLM:
    """An engine on the flash_attn double (resolve_attention_backend wants CUDA for it)."""
    llm = LLM(checkpoint_dir, dtype="bfloat16", block_size=256, max_num_batched_tokens=40)
    llm.engine.runner.attention_backend = AttentionBackend("flash_attn", FlashPagedAttention,
                                                           FlashDecodeAttention, 256)
    return llm


def per_step(llm: LLM, watch: SyncWatch, params: SamplingParams, num_prompts: int = 5) -> list[tuple]:
    """(reads, blocking copies, copies) of each step of a small batch."""
    engine = llm.engine
    for prompt in make_prompts(num_prompts, seed=7):
        engine.add_request(None, prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        watch.reads, watch.blocking_copies, watch.copies = [], [], 0
        with watch:
            engine.step()
        steps.append((watch.reads, watch.blocking_copies, watch.copies))
    return steps


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=3, max_tokens=6,
                        ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_greedy_step_reads_back_once_and_copies_once(checkpoint_dir, watch, graphs):
    llm = flash_llm(checkpoint_dir)
    if graphs:
        with_decode_graphs(llm)
    steps = per_step(llm, watch, GREEDY)
    assert len(steps) >= 6
    for reads, blocking, copies in steps:
        assert (reads, blocking, copies) == (["tolist"], [], 1)


def test_a_sampling_step_adds_one_copy_of_its_settings_and_reads_back_once(checkpoint_dir, watch):
    llm = flash_llm(checkpoint_dir)
    with_decode_graphs(llm)
    for reads, blocking, copies in per_step(llm, watch, SEEDED):
        assert (reads, blocking, copies) == (["tolist"], [], 2)


def test_triton_steps_build_their_tile_tables_without_waiting(checkpoint_dir, watch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is decorated, at import
    pytest.importorskip("triton")
    # a fresh import decorates the kernel for the interpreter, whatever imported it before
    monkeypatch.delitem(sys.modules, "microvllm.model.attention.triton", raising=False)
    triton_attention = importlib.import_module("microvllm.model.attention.triton")
    kernel = triton_attention._paged_attention_kernel

    class PausedLaunch:
        def __getitem__(self, grid):
            return watch.pausing(kernel[grid])
    monkeypatch.setattr(triton_attention, "_paged_attention_kernel", PausedLaunch())
    llm = LLM(checkpoint_dir, attention_backend="triton", block_size=4, max_num_batched_tokens=40)
    for reads, blocking, copies in per_step(llm, watch, GREEDY, num_prompts=3):
        assert (reads, blocking, copies) == (["tolist"], [], 1)
