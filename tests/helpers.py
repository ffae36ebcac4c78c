"""Helpers that several test modules share.

- Completions: generated token ids and log-probs, in a form that compares as the
  determinism tests need.
- Decode graphs without a GPU: a capture stand-in that re-runs the forward on each replay.
- Paged attention steps: random steps over a paged KV cache, for holding an attention
  backend against SDPA.
- Triton on the CPU: the Triton backend imported for Triton's interpreter.
- Tool calls: the tokens of a call and of its answer, and a logits processor that makes
  the model write a given call.

(Checkpoints are written and read back by checkpoints.py, the full-recompute reference
forward is reference.py, and the flash_attn test double is fake_flash_attn.py.)
"""

import importlib
import os
import random

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.arithmetic import cdiv
from microvllm.engine.cuda_graphs import DecodeGraphs
from microvllm.engine.kv_cache import DecodeKVView, PagedKVCache, SequenceKVView
from microvllm.model.attention import SdpaPagedAttention


# --- completions ----------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


def make_prompts(count, seed=0, shared_prefix=()):
    rng = random.Random(seed)
    return [list(shared_prefix) + [rng.randrange(256) for _ in range(rng.randrange(1, 40))]
            for _ in range(count)]


class Completion:
    """Token ids compared exactly, log-probs to 1e-4."""

    def __init__(self, output):
        self.token_ids = output.token_ids
        self.logprobs = [e[t].logprob for e, t in zip(output.logprobs or [], output.token_ids)]

    def __eq__(self, other):
        return self.token_ids == other.token_ids and self.logprobs == pytest.approx(other.logprobs, abs=1e-4)

    def __repr__(self):
        return f"Completion({self.token_ids})"


def completions(llm, prompts, params=GREEDY):
    return [Completion(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]


def varied_lengths(count, seed=0):
    """Greedy params whose max_tokens vary, so requests finish at different steps."""
    rng = random.Random(seed)
    return [SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True, logprobs=0)
            for _ in range(count)]


# --- decode graphs without a GPU --------------------------------------------------------

class CountingCapture:
    """Records nothing: a replay runs the forward again and writes the result into the
    output of the first run, as a graph replay overwrites its captured output."""

    def __init__(self):
        self.replays = {}

    def __call__(self, forward):
        output = forward()

        def replay():
            output.copy_(forward())
            self.replays[len(output)] = self.replays.get(len(output), 0) + 1
            return output
        return replay


def with_decode_graphs(llm: LLM) -> CountingCapture:
    """Gives llm's engine DecodeGraphs "captured" by a CountingCapture, as on CUDA."""
    engine, capture = llm.engine, CountingCapture()
    engine.runner.decode_graphs = DecodeGraphs(
        engine.model, engine.kv_cache, engine.runner.attention_backend.decode,
        engine.config.max_num_seqs, engine.max_model_len, engine.device, capture)
    return capture


# --- paged attention steps --------------------------------------------------------------

# decodes first, then prefill chunks: one from scratch, two resuming after a cached
# prefix; at block size 256 the second decode and the last chunk read keys from two
# blocks, and the last chunk's queries cross from the first block into the second
MIXED_QUERY_LENS = [1, 1, 7, 20, 40]
MIXED_CONTEXT_LENS = [9, 300, 7, 60, 280]
# Triton runs in its interpreter on the CPU, so its mixed step is smaller: decodes first,
# then prefill chunks, one from scratch and two resuming mid-sequence after a cached
# prefix; the long ones span several query tiles and key tiles
TRITON_MIXED_QUERY_LENS = [1, 1, 5, 40, 70]
TRITON_MIXED_CONTEXT_LENS = [9, 75, 12, 110, 70]
# head layouts a kernel is held to: pytest.mark.parametrize(**HEAD_SHAPES)
HEAD_SHAPES = dict(argnames="n_head, n_kv_head, head_dim", argvalues=[(4, 2, 8), (2, 2, 16), (6, 2, 64)],
                   ids=["gqa", "mha", "gqa-group-of-3"])


def random_step(query_lens, context_lens, block_size, n_kv_head, head_dim, dtype, device="cpu", seed=0):
    """A cache full of random K/V, each sequence's blocks scattered over it, and the view
    of one step; built twice from one seed, so each backend writes into its own copy."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [cdiv(c, block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 1  # block 0 only pads the block tables
    cache = PagedKVCache(2, num_blocks, block_size, n_kv_head, head_dim, dtype, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    owned = (torch.randperm(num_blocks - 1, generator=gen) + 1).split(blocks_per_seq)
    block_tables = torch.zeros(len(owned), max(blocks_per_seq), dtype=torch.int64)
    slots = []
    for row, (blocks, q, c) in enumerate(zip(owned, query_lens, context_lens)):
        block_tables[row, :len(blocks)] = blocks
        positions = torch.arange(c - q, c)
        slots.append(blocks[positions // block_size] * block_size + positions % block_size)
    return SequenceKVView(cache, torch.cat(slots).to(device), block_tables.to(device), query_lens, context_lens)


def as_decode_view(view: SequenceKVView, table_width: int) -> DecodeKVView:
    """The same decode-only step as graphs see it: lengths on the device, block tables
    widened to table_width with the cache's padding block."""
    device = view.slot_mapping.device
    tables = torch.full((len(view.query_lens), table_width), view.cache.padding_block, device=device)
    tables[:, :view.block_tables.shape[1]] = view.block_tables
    return DecodeKVView(view.cache, view.slot_mapping, tables, torch.tensor(view.context_lens, device=device))


def compare_decode_twin(decode_backend, context_lens, block_size, table_width, window, dtype=torch.float32,
                        device="cpu", n_head=4, n_kv_head=2, head_dim=16):
    """(decode twin's output, SdpaPagedAttention's output) for one decode-only step (GQA 4:2 unless told)."""
    return compare_backends(lambda view: decode_backend(as_decode_view(view, table_width)),
                            [1] * len(context_lens), context_lens, block_size, n_head, n_kv_head, head_dim,
                            window, dtype, device)


def compare_backends(backend, query_lens, context_lens, block_size, n_head, n_kv_head, head_dim,
                     window, dtype=torch.float32, device="cpu"):
    """(backend's output, SdpaPagedAttention's output) for layer 1 of one random step."""
    gen = torch.Generator().manual_seed(1)
    n = sum(query_lens)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen).to(device, dtype) for h in (n_head, n_kv_head, n_kv_head))
    views = [random_step(query_lens, context_lens, block_size, n_kv_head, head_dim, dtype, device)
             for _ in range(2)]
    got = backend(views[0])(1, q, k, v, window)
    want = SdpaPagedAttention(views[1])(1, q, k, v, window)
    assert torch.equal(views[0].cache.k, views[1].cache.k)  # the step's K/V were written
    return got, want


# --- Triton on the CPU ------------------------------------------------------------------

def import_triton_attention():
    """microvllm.model.attention.triton with its kernels decorated for Triton's CPU
    interpreter, or a skip where triton is not installed. TRITON_INTERPRET=1 is read when
    a kernel is decorated (at import), so it is set for the import only; tests that run
    the kernels set it too (the backend check reads it)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        return importlib.import_module("microvllm.model.attention.triton")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


# -- tool calls ------------------------------------------------------------------------

def tool_call(tokenizer, expression: str) -> list[int]:
    """The tokens of a call to a tool: <|python_start|> expression <|python_end|>."""
    special = tokenizer.special
    return [special["<|python_start|>"], *tokenizer.encode(expression, prepend_bos=False),
            special["<|python_end|>"]]


def tool_answer(tokenizer, text: str) -> list[int]:
    """The tokens the engine forces for a tool's answer: <|output_start|> text <|output_end|>."""
    special = tokenizer.special
    return [special["<|output_start|>"], *tokenizer.encode(text, prepend_bos=False),
            special["<|output_end|>"]]


def writing(script: list[int]):
    """A logits processor that makes the model write `script` first, then leaves it be."""
    def processor(output_ids, logits):
        if len(output_ids) < len(script):
            forced = torch.full_like(logits, float("-inf"))
            forced[script[len(output_ids)]] = 0.0
            return forced
        return logits
    return processor


def nanochat_engine_or_skip(checkpoint):
    """nanochat's own Engine on `checkpoint`, from the checkout $NANOCHAT_SRC names; the
    test skips where there is none, or where its dependencies do not import here."""
    src = os.environ.get("NANOCHAT_SRC")
    if not src:
        pytest.skip("set NANOCHAT_SRC to a nanochat checkout to compare with it")
    from benchmarks.nanochat_reference import nanochat_engine
    try:
        return nanochat_engine(src, checkpoint)
    except ImportError as e:
        pytest.skip(f"nanochat does not import from {src}: {e}")
