"""Decode steps through DecodeGraphs give exactly what eager steps give.

There is no GPU here, so the graphs are "captured" by a stand-in that re-runs the
forward on each replay into one output tensor: everything but the recording itself
(static buffers, padding up to a captured size, the padding block, the decode
attention twins, an output overwritten by every replay) runs as it does on CUDA.
"""

import logging

import pytest
import torch
from helpers import compare_decode_twin, completions, make_prompts, varied_lengths, with_decode_graphs

from microvllm import LLM, SamplingParams
from microvllm.engine.cuda_graphs import DecodeGraphs, capture_batch_sizes
from microvllm.platform import platform_for
from microvllm.model.attention import SdpaDecodeAttention


@pytest.mark.parametrize("max_num_seqs, sizes", [
    (256, [1, 2, 4, 8] + list(range(16, 257, 16))),
    (100, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]),
    (10, [1, 2, 4, 8, 10]),
    (1, [1]),
])
def test_capture_sizes_are_powers_of_two_then_every_16(max_num_seqs, sizes):
    assert capture_batch_sizes(max_num_seqs) == sizes


# block tables 40 blocks of 4 wide: the 160-key context fills its table, so a window's
# fixed-size read runs past the table's end
@pytest.mark.parametrize("window", [None, 5, 20])
def test_sdpa_decode_twin_matches_sdpa(window):
    got, want = compare_decode_twin(SdpaDecodeAttention, [1, 33, 130, 160], 4, 40, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padded_graph_batches_match_eager_steps(windowed_checkpoint):
    # 23 requests ending at different steps: the decode batch shrinks through 17..23
    # (padded to 32), 9..16, 5..8, 3..4 and 2
    prompts, params = make_prompts(23, seed=1), varied_lengths(23)
    eager = completions(LLM(windowed_checkpoint, block_size=4, max_num_seqs=40), prompts, params)
    llm = LLM(windowed_checkpoint, block_size=4, max_num_seqs=40)
    capture = with_decode_graphs(llm)
    assert completions(llm, prompts, params) == eager
    assert {32, 16, 8, 4, 2} <= set(capture.replays)


def test_decodes_past_the_sliding_window_match_eager_steps(windowed_checkpoint):
    # the longest grows to max_model_len (64), filling its block table, twice the window
    prompts = make_prompts(5, seed=2)
    params = SamplingParams(temperature=0, max_tokens=64 - max(map(len, prompts)), ignore_eos=True, logprobs=0)
    eager = completions(LLM(windowed_checkpoint, block_size=4), prompts, params)
    llm = LLM(windowed_checkpoint, block_size=4)
    with_decode_graphs(llm)
    assert completions(llm, prompts, params) == eager


def test_graphs_under_preemption_and_prefix_hits_match_eager_steps(checkpoint_dir):
    prompts = make_prompts(30, seed=3, shared_prefix=[256, 1, 2, 3, 4, 5, 6, 7, 8])
    eager = completions(LLM(checkpoint_dir), prompts)
    tight = LLM(checkpoint_dir, block_size=4, num_blocks=24)
    with_decode_graphs(tight)
    assert completions(tight, prompts) == eager
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_through_graphs_matches_eager_steps(checkpoint_dir):
    prompts = make_prompts(12, seed=4)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=10, ignore_eos=True, logprobs=2)
    eager = completions(LLM(checkpoint_dir), prompts, params)
    llm = LLM(checkpoint_dir)
    with_decode_graphs(llm)
    assert completions(llm, prompts, params) == eager


@pytest.mark.slow  # long decodes in Triton's interpreter
def test_triton_decode_twin_through_graphs_matches_eager_steps(make_checkpoint, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when triton is first imported
    pytest.importorskip("triton")
    # era C, "SL" in two layers: one windowed layer (the last 32 keys) and one full; each
    # layer's kernel costs a second per step in Triton's interpreter
    checkpoint = make_checkpoint(era="C", window_pattern="SL", n_layer=2)
    prompts = make_prompts(3, seed=5)  # 17, 12 and 11 tokens
    # 42 tokens in all: past the 32 keys the windowed layer sees, by two blocks of 4
    params = SamplingParams(temperature=0, max_tokens=42 - max(map(len, prompts)), ignore_eos=True, logprobs=0)
    eager = completions(LLM(checkpoint, block_size=4), prompts, params)
    llm = LLM(checkpoint, block_size=4, attention_backend="triton", max_num_seqs=4)
    capture = with_decode_graphs(llm)
    assert completions(llm, prompts, params) == eager
    assert set(capture.replays) >= {4}


def test_cpu_engines_capture_no_graphs(checkpoint_dir):
    assert LLM(checkpoint_dir).engine.runner.decode_graphs is None
    assert LLM(checkpoint_dir, enforce_eager=True).engine.runner.decode_graphs is None


def test_a_failed_capture_says_how_to_run_without_graphs(checkpoint_dir):
    engine = LLM(checkpoint_dir).engine

    def broken_capture(forward):
        raise RuntimeError("operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="enforce_eager=True runs every step without graphs"):
        DecodeGraphs(engine.model, engine.kv_cache, engine.runner.attention_backend.decode,
                     4, engine.max_model_len, engine.device, broken_capture)


class CopyWatchingEvent:
    """Stands in for the CUDA event after each input copy: between record() (the copy is
    in flight) and synchronize() (the host waits for it) the host buffer must not change."""

    def __init__(self, host: torch.Tensor):
        self.host, self.in_flight, self.waits = host, None, 0

    def record(self):
        self.in_flight = self.host.clone()

    def synchronize(self):
        if self.in_flight is not None:
            assert torch.equal(self.host, self.in_flight), "host buffer rewritten during its copy"
            self.waits += 1
        self.in_flight = None


def test_each_step_waits_for_the_previous_input_copy_before_rewriting(checkpoint_dir, monkeypatch):
    llm = LLM(checkpoint_dir, block_size=4)
    with_decode_graphs(llm)
    graphs = llm.engine.runner.decode_graphs
    event = graphs.copy_done = CopyWatchingEvent(graphs.host)
    real_fill = graphs._fill_padding

    def fill_while_watching(first_row, end_row):
        assert event.in_flight is None, "host buffer rewritten before waiting on the last copy"
        real_fill(first_row, end_row)
    monkeypatch.setattr(graphs, "_fill_padding", fill_while_watching)
    llm.generate(make_prompts(3, seed=6), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    assert event.waits == 4  # five decode steps after the prefill: the last four wait


def test_graphs_over_the_sdpa_decode_twin_warn_and_say_what_to_install(caplog):
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="microvllm"):
        assert platform_for(cuda).uses_decode_graphs(False, "triton", 2048)
        assert not caplog.text
        assert platform_for(cuda).uses_decode_graphs(False, "sdpa", 2048)
        assert not platform_for(cuda).uses_decode_graphs(True, "sdpa", 2048)
        assert not platform_for(torch.device("cpu")).uses_decode_graphs(False, "sdpa", 2048)
    assert caplog.text.count("max_model_len=2048 keys") == 1
    assert "pip install triton" in caplog.text and "enforce_eager=True" in caplog.text
