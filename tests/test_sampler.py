"""The sampler's cost at a large vocabulary: noise only where a row samples, in bounded
chunks, few passes over [rows, vocab], and prompt log-probs a chunk at a time; none of
it changes which tokens come out."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from microvllm import LLM, SamplingParams
from microvllm.cpu.kernels import load_library
from microvllm.cpu.sampling import uniform_noise as c_uniform_noise
from microvllm.engine import logprobs, sampler
from microvllm.engine.sampler import Sampler
from microvllm.engine.sequence import Request, Sequence

VOCAB = 4096


def sequences(params: list[SamplingParams]) -> list[Sequence]:
    """One per params; a sequence's noise seed comes from its params' seed and its row."""
    return [Sequence(i, Request(str(i), None, [1, 2, 3], p), 0, [1, 2, 3], seed=1000 * (p.seed or 0) + i)
            for i, p in enumerate(params)]


def sample(params, logits=None, noise=None):
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(0)) if logits is None \
        else logits
    return Sampler(frozenset(), noise=noise).__call__(logits, sequences(params)).token_ids


class FullPasses(TorchDispatchMode):
    """Counts the ops whose output is at least [rows, vocab], and the largest 64-bit one."""

    def __init__(self, full_size: int):
        super().__init__()
        self.full_size, self.passes, self.largest_64_bit = full_size, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.passes += t.numel() >= self.full_size
                if t.dtype in (torch.int64, torch.float64):
                    self.largest_64_bit = max(self.largest_64_bit, t.numel())
        return out


def test_noise_is_drawn_only_for_rows_that_sample():
    rows = []
    noise = lambda s, p, v: rows.append(len(s)) or sampler.uniform_noise(s, p, v)
    params = [SamplingParams(temperature=0)] * 5 + [SamplingParams(temperature=0.7, seed=1)] * 3
    tokens = sample(params, noise=noise)
    assert sum(rows) == 3
    greedy_only = sample([SamplingParams(temperature=0)] * 5, noise=noise)
    assert tokens[:5] == greedy_only and sum(rows) == 3


@pytest.mark.skipif(load_library() is None, reason="needs the CPU kernels (a C compiler)")
def test_the_c_kernels_noise_is_the_torch_ops_noise():
    seeds = torch.tensor([0, 1, 2**62 + 12345, 2**40 + 5])
    positions = torch.tensor([0, 7, 1000, 3])
    everyone = torch.arange(VOCAB)
    assert torch.equal(c_uniform_noise(seeds, positions, everyone), sampler.uniform_noise(seeds, positions, everyone))
    candidates = torch.randint(0, 65536, (4, 50))
    assert torch.equal(c_uniform_noise(seeds, positions, candidates),
                       sampler.uniform_noise(seeds, positions, candidates))


def test_noise_chunks_draw_what_one_pass_draws(monkeypatch):
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(9)]
    whole = sample(params)
    monkeypatch.setattr(sampler, "NOISE_CHUNK_ELEMENTS", 2 * VOCAB)  # 2 rows a chunk, the last alone
    assert sample(params) == whole


def test_sampling_makes_few_full_passes_besides_the_noise_and_keeps_that_to_a_chunk(monkeypatch):
    # chunks of 4 rows take the noise's passes (hash, logs) out of the full-size count
    monkeypatch.setattr(sampler, "NOISE_CHUNK_ELEMENTS", 4 * VOCAB)
    rows = 16
    logits = torch.randn(rows, VOCAB)
    params = [SamplingParams(temperature=0.8, min_p=0.05, seed=s) for s in range(rows)]
    with FullPasses(rows * VOCAB) as watch:
        sample(params, logits)
    # the copy of the sampling rows, the temperature, the min-p floor's mask and fill
    assert watch.passes <= 6
    assert watch.largest_64_bit <= 4 * VOCAB


def test_top_k_past_the_vocabulary_keeps_every_token():
    unbounded = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    huge_k = [SamplingParams(temperature=1.0, seed=s, top_k=10 * VOCAB) for s in range(4)]
    mixed = [SamplingParams(temperature=1.0, seed=0, top_k=10 * VOCAB), SamplingParams(temperature=1.0, top_k=5)]
    assert sample(huge_k) == sample(unbounded)
    assert len(sample(mixed)) == 2


def test_top_k_rows_draw_over_their_candidates_what_the_whole_vocabulary_would_give():
    """The top-k path samples among k candidates; the same logits with everything past
    the k-th masked, sampled over the whole vocabulary, must give the same tokens."""
    rows = 12
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.7, top_k=k, top_p=p, min_p=m, seed=s)
              for s, (k, p, m) in enumerate([(1, 1.0, 0.0), (5, 1.0, 0.0), (50, 0.9, 0.0), (50, 1.0, 0.1)] * 3)]
    masked = logits.clone()
    for row, p in enumerate(params):
        masked[row][masked[row] < masked[row].topk(p.top_k).values[-1]] = float("-inf")
    whole = [SamplingParams(temperature=p.temperature, top_p=p.top_p, min_p=p.min_p, seed=p.seed) for p in params]
    with FullPasses(rows * VOCAB) as watch:
        tokens = sample(params, logits)
    assert tokens == sample(whole, masked)
    assert len(set(tokens)) > 4
    assert watch.largest_64_bit < rows * VOCAB  # no noise over the whole vocabulary


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    # probabilities 0.5, 0.3, 0.2 (and nothing else): top_p 0.8 keeps the first two only
    logits = torch.full((1, VOCAB), float("-inf"))
    logits[0, [10, 20, 30]] = torch.tensor([0.5, 0.3, 0.2]).log()
    seen = {sample([SamplingParams(temperature=1.0, top_p=0.8, seed=s)], logits)[0] for s in range(60)}
    assert seen == {10, 20}


def test_prompt_logprobs_in_chunks_match_one_pass(checkpoint_dir, monkeypatch):
    llm = LLM(checkpoint_dir)
    prompt = [(5 * i) % 250 for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    whole = llm.generate([prompt], params, use_tqdm=False)[0].prompt_logprobs
    monkeypatch.setattr(logprobs, "PROMPT_LOGPROBS_CHUNK", 7)
    llm = LLM(checkpoint_dir, enable_prefix_caching=False)
    chunked = llm.generate([prompt], params, use_tqdm=False)[0].prompt_logprobs
    assert len(chunked) == len(prompt)
    for got, want in zip(chunked[1:], whole[1:]):
        assert got.keys() == want.keys()
        for token in got:
            assert got[token].rank == want[token].rank
            assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-5)
