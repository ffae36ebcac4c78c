"""Decode memory-bandwidth utilisation: the bytes a decode step must read, over its time,
over the device's peak bandwidth.

A pure decode step streams every weight matrix once (of an embedding table, only the
rows of the batch's tokens) and each sequence's cached keys and values: per layer its
whole context, or just its window on sliding-window layers. At batch 64 and up a decode
step is bound by memory bandwidth, so this ratio says how close the engine gets to the
hardware. The step time includes the engine's scheduling and sampling: that is what a
user waits for.
"""

import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from microvllm import LLM, SamplingParams
from microvllm.model.config import ModelConfig

from .workloads import synthetic_requests

# (pattern in torch.cuda.get_device_name, peak HBM bandwidth in GB/s), first match wins
PEAK_BANDWIDTH_GB_S = (
    (r"\bH100\b.*\bPCIe\b", 2000),
    (r"\bH100\b.*\bNVL\b", 3900),
    (r"\bH100\b", 3350),          # SXM
    (r"\bH200\b", 4800),          # \b keeps the GH200 superchip out
    (r"\bA100\b.*80GB.*\bPCIe\b", 1935),
    (r"\bA100\b.*80GB", 2039),
)


def peak_bandwidth_gb_s(device: torch.device) -> float | None:
    """The device's peak memory bandwidth, or None where it is not known (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gb_s for pattern, gb_s in PEAK_BANDWIDTH_GB_S if re.search(pattern, name)), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes_per_step(model: nn.Module, batch_size: int) -> int:
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(batch_size * p.shape[1] * p.element_size() if id(p) in tables else p.nbytes
               for p in model.parameters())


def kv_bytes_per_step(config: ModelConfig, context_lens: list[int], element_size: int) -> int:
    """K and V read by one decode token per sequence; `context_lens` count that token too."""
    # a window w lets a query see w + 1 keys (itself and w before it)
    keys = sum(min(c, w + 1) if w is not None else c for c in context_lens for w in config.window_sizes)
    return keys * 2 * config.n_kv_head * config.head_dim * element_size


@dataclass
class DecodeMeasurement:
    batch_size: int
    mean_context: float      # tokens of context per sequence, over the timed steps
    steps: int
    step_s: float
    weight_bytes: int        # per step
    kv_bytes: float          # per step, averaged over the timed steps
    bandwidth_gb_s: float
    utilisation: float | None   # of the peak bandwidth; None where the peak is unknown


def measure_decode(llm: LLM, batch_size: int, prompt_len: int, steps: int, warmup_steps: int,
                   peak_gb_s: float | None, seed: int) -> DecodeMeasurement:
    """Time `steps` decode steps of `batch_size` sequences prefilled with `prompt_len` tokens.

    Prompts are random, drawn from `seed`: give each measurement its own, or its prompts
    hit the prefix cache of the last one. Sequences admitted early decode while later
    ones still prefill, so their contexts differ by up to the number of prefill steps;
    the bytes are counted from each one's own context.
    """
    engine, scheduler = llm.engine, llm.engine.scheduler
    if batch_size > scheduler.max_num_seqs or engine.has_unfinished_requests():
        raise ValueError(f"decode batch {batch_size} needs an idle engine with max_num_seqs >= {batch_size}")
    tokenizer = engine.tokenizer
    prompts = synthetic_requests(batch_size, (prompt_len, prompt_len), (1, 1), min(tokenizer.special_ids),
                                 tokenizer.bos_id, seed)
    # far more tokens than the measurement needs, so no sequence finishes during it
    params = SamplingParams(temperature=0, max_tokens=engine.max_model_len - prompt_len, ignore_eos=True)
    request_ids = [engine.add_request(None, p.prompt_token_ids, params) for p in prompts]
    preemptions = scheduler.num_preemptions
    too_small = (f"the KV cache cannot hold {batch_size} sequences of {prompt_len} tokens decoding "
                 "together: measure a smaller batch or a shorter context")
    try:
        while scheduler.waiting or any(s.num_tokens - s.num_computed_tokens > 1 for s in scheduler.running):
            engine.step()
            if scheduler.num_preemptions != preemptions:
                raise RuntimeError(too_small)
        for _ in range(warmup_steps):
            engine.step()
        seqs = list(scheduler.running)
        first_contexts = [s.num_computed_tokens + 1 for s in seqs]
        synchronize(engine.device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(engine.device)
        elapsed = time.perf_counter() - start
        if scheduler.num_preemptions != preemptions or \
                any(s.num_computed_tokens + 1 != c + steps for s, c in zip(seqs, first_contexts)):
            raise RuntimeError(too_small)
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)

    config, element_size = engine.model.config, engine.kv_cache.k.element_size()
    kv_bytes = sum(kv_bytes_per_step(config, [c + i for c in first_contexts], element_size)
                   for i in range(steps)) / steps
    weight_bytes = weight_bytes_per_step(engine.model, batch_size)
    step_s = elapsed / steps
    bandwidth = (weight_bytes + kv_bytes) / step_s / 1e9
    return DecodeMeasurement(batch_size, sum(first_contexts) / batch_size + (steps - 1) / 2, steps, step_s,
                             weight_bytes, kv_bytes, bandwidth, bandwidth / peak_gb_s if peak_gb_s else None)
