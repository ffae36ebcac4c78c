"""Sampler: picks the next token of every sampling sequence of a step in one batch.

Randomness is counter-based: the noise for (sequence seed, output position, token id)
is a hash of those three numbers. A seeded request therefore draws the same tokens
whatever else is in the batch, and a preempted sequence redraws the same token when it
is recomputed, with no per-sequence generator objects or Python loops over tokens.
Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws from
exactly the distribution p.
"""

from dataclasses import dataclass

import torch

from .logits_processors import shape_logits
from .sequence import Sequence

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # a 32-bit integer finaliser (xor-shift-multiply); int64 products wrap, low bits stay exact
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1), a pure function of (seed, position, token id)."""
    row_key = _hash32(_hash32((seeds & _MASK32) ^ _hash32(seeds >> 32)) ^ positions)
    token_ids = torch.arange(vocab_size, device=seeds.device)
    bits = _hash32((row_key.unsqueeze(1) + token_ids * 0x9E3779B9) & _MASK32)
    return (bits.double() + 0.5) / 2.0**32


@dataclass
class SampledTokens:
    token_ids: list[int]
    logprobs: list[float] | None = None             # of the sampled tokens, per row
    ranks: list[int] | None = None
    top_ids: list[list[int]] | None = None          # top-k ids and log-probs, per row
    top_logprobs: list[list[float]] | None = None


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        device = logits.device
        params = [s.params for s in seqs]
        raw_logits = logits
        logits = shape_logits(logits, seqs)  # allowed_token_ids, bad_words, logits_processors
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits, seqs)
        blocked = self._blocked_tokens(seqs)
        if blocked:
            rows, cols = zip(*blocked)
            logits = logits.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                                      torch.tensor(float("-inf"), device=device))
        token_ids = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            sampled = self._sample(logits, seqs)
            greedy = torch.tensor([p.greedy for p in params], device=device)
            token_ids = torch.where(greedy, token_ids, sampled)
        result = SampledTokens(token_ids.tolist())
        max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if max_logprobs is not None:
            self._fill_logprobs(result, raw_logits, token_ids, max_logprobs)
        return result

    def _blocked_tokens(self, seqs) -> list[tuple[int, int]]:
        """(row, token) pairs that may not be sampled: EOS and stop ids before min_tokens."""
        blocked = []
        for row, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                blocked += [(row, t) for t in stops]
        return blocked

    @staticmethod
    def _apply_penalties(logits, seqs) -> torch.Tensor:
        # vLLM's conventions: repetition over prompt and output, the others over output only
        device, vocab = logits.device, logits.shape[1]
        rows = len(seqs)

        def counts(token_lists):
            width = max(1, max(len(t) for t in token_lists))
            padded = torch.full((rows, width), vocab, dtype=torch.long)
            for r, tokens in enumerate(token_lists):
                padded[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            c = torch.zeros(rows, vocab + 1, device=device)
            return c.scatter_add_(1, padded.to(device), torch.ones_like(padded, dtype=c.dtype, device=device))[:, :vocab]

        output_counts = counts([s.output_token_ids for s in seqs])
        seen = counts([s.token_ids for s in seqs]) > 0
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=device).unsqueeze(1)
        presence = torch.tensor([s.params.presence_penalty for s in seqs], device=device).unsqueeze(1)
        frequency = torch.tensor([s.params.frequency_penalty for s in seqs], device=device).unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        return logits - frequency * output_counts - presence * (output_counts > 0)

    @staticmethod
    def _sample(logits, seqs) -> torch.Tensor:
        device = logits.device
        params = [s.params for s in seqs]
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        logits = logits / temperature.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
        if min(top_k) < logits.shape[1]:
            kth = logits.topk(max(top_k), dim=-1).values.gather(
                1, torch.tensor(top_k, device=device).unsqueeze(1) - 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the more likely tokens before it already reach top_p
            drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.long, device=device)
        positions = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.long, device=device)
        exponential = -torch.log(uniform_noise(seeds, positions, logits.shape[1]))
        return (probs.double() / exponential).argmax(dim=-1)

    @staticmethod
    def _fill_logprobs(result: SampledTokens, raw_logits, token_ids, k: int) -> None:
        logprobs = raw_logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1))
        result.logprobs = chosen.squeeze(1).tolist()
        result.ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        if k:
            top = logprobs.topk(k, dim=-1)
            result.top_ids, result.top_logprobs = top.indices.tolist(), top.values.tolist()
