"""Sampler: picks the next token of every sampling sequence of a step in one batch.

Randomness is counter-based: the noise for (sequence seed, output position, token id)
is a hash of those three numbers. A seeded request therefore draws the same tokens
whatever else is in the batch, and a preempted sequence redraws the same token when it
is recomputed, with no per-sequence generator objects or Python loops over tokens.
Sampling is the Gumbel-max race: the argmax over tokens of logit / temperature plus
-log(-log u) draws from exactly softmax(logit / temperature).

At a vocabulary of 65,536 a row of anything is 256 KB to 512 KB, so the work is laid
out to pass over [rows, vocab] as few times as possible: greedy rows stop at argmax;
only rows that sample get noise, in chunks of bounded size. Rows with a top-k (nanochat
samples with top_k=50) leave the vocabulary after one topk: their top-p, min-p and noise
are computed over their k candidates only. Other rows turn top-p and min-p into one
per-row floor on the logits, and only top-p sorts. Everything a step sends
the device travels in one copy, and the tokens (with their log-probs) come back in one.
"""

import operator
from typing import Callable
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from ..sampling_params import SamplingParams
from ..structured.bitmasks import GrammarBitmasks
from .features import logits_masks
from .logits_processors import shape_logits
from .logprobs import LogprobRows, logprob_table
from .sequence import Sequence
from .transfer import to_device

_MASK32 = 0xFFFFFFFF
# bounds one chunk of sampling noise ([rows, vocab] int64, then float64) at 32 MiB
NOISE_CHUNK_ELEMENTS = 2**22


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    # a 32-bit integer finaliser (xor-shift-multiply), in place on int64 values below 2^32;
    # int64 products wrap, and the low 32 bits stay exact
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) for each row's `token_ids` ([tokens], the same for every
    row, or [rows, tokens]), a pure function of (seed, position, token id)."""
    row_key = _hash32_(_hash32_((seeds & _MASK32) ^ _hash32_(seeds >> 32)) ^ positions)
    token_keys = token_ids * 0x9E3779B9
    bits = _hash32_(torch.add(row_key.unsqueeze(1), token_keys).bitwise_and_(_MASK32))
    return bits.double().add_(0.5).div_(2.0**32)


def distinct_params(seqs: list[Sequence]) -> list[SamplingParams]:
    """The SamplingParams objects of `seqs`, each once."""
    params = [seq.params for seq in seqs]
    if all(map(operator.is_, params, repeat(params[0]))):  # most steps share one: checked at C speed
        return params[:1]
    return list({id(p): p for p in params}.values())


def gumbel_argmax(x: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  argmax: Callable[[torch.Tensor], torch.Tensor], token_ids: torch.Tensor | None = None,
                  noise: Callable[..., torch.Tensor] = uniform_noise) -> torch.Tensor:
    """Per row, the column of argmax(x + Gumbel noise): a draw from softmax(x). Column j
    of a row is token j, or token_ids[row, j] where given (a row's candidates). `noise`
    is uniform_noise or a device's faster twin of it."""
    width = x.shape[1]
    rows_per_chunk = max(1, NOISE_CHUNK_ELEMENTS // width)
    columns = torch.empty(len(x), dtype=torch.long, device=x.device)
    all_tokens = torch.arange(width, device=x.device) if token_ids is None else None
    for first in range(0, len(x), rows_per_chunk):
        rows = slice(first, first + rows_per_chunk)
        ids = all_tokens if token_ids is None else token_ids[rows]
        gumbel = noise(seeds[rows], positions[rows], ids).log_().neg_().log_().neg_()
        columns[rows] = argmax(gumbel.add_(x[rows]))
    return columns


@dataclass
class SampledTokens:
    token_ids: list[int]
    logprobs: LogprobRows | None = None  # where any row asked for log-probs


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int],
                 argmax: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.argmax(dim=-1),
                 noise: Callable[..., torch.Tensor] | None = None):
        self.eos_token_ids = sorted(eos_token_ids)
        self.argmax = argmax  # over the last dim; the platform's fastest
        self.noise = noise or uniform_noise  # the platform's, where it has a faster one
        self.grammar_bitmasks = GrammarBitmasks()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        # the step's distinct SamplingParams say which of the passes below it needs; a
        # greedy step of plain requests is an argmax
        step_params = distinct_params(seqs)
        raw_logits = logits
        k = max((p.logprobs for p in step_params if p.logprobs is not None), default=None)
        if any(p.shapes_logits for p in step_params):  # allowed_token_ids, bad_words, logits_processors
            logits = shape_logits(logits, seqs)
        if any(p.structured_outputs is not None for p in step_params):
            # masked in place: on a copy where the raw logits give log-probs
            logits = self.grammar_bitmasks.apply(logits.clone() if logits is raw_logits and k is not None
                                                 else logits, logits_masks(seqs))
        if any(p.has_penalties for p in step_params):
            logits = self._apply_penalties(logits, seqs)
        if any(p.min_tokens for p in step_params):
            logits = self._block_stops_before_min_tokens(logits, seqs)
        token_ids = self.argmax(logits)
        if not all(p.greedy for p in step_params):
            self._sample_rows(logits, seqs, token_ids)
        if k is None:
            return SampledTokens(token_ids.tolist())
        rows = LogprobRows.read(logprob_table(raw_logits, token_ids, k), k)
        return SampledTokens(rows.token_ids, rows)

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence], token_ids: torch.Tensor) -> None:
        """Replace, in `token_ids`, the argmax of each row that samples with its draw."""
        vocab, with_top_k, without = logits.shape[1], [], []
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                (with_top_k if 0 < seq.params.top_k < vocab else without).append(row)
        for sampling_rows, sample in ((with_top_k, self._sample_top_k), (without, self._sample)):
            if sampling_rows:
                rows, sampled = sample(logits, [seqs[r] for r in sampling_rows], sampling_rows)
                token_ids.index_copy_(0, rows, sampled)

    def _block_stops_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        blocked = self._blocked_tokens(seqs)
        if not blocked:
            return logits
        index = to_device(dict(rows=np.array([r for r, _ in blocked]),
                               tokens=np.array([t for _, t in blocked])), logits.device)
        return logits.index_put((index["rows"], index["tokens"]), torch.tensor(float("-inf"), device=logits.device))

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
        vocab, rows = logits.shape[1], len(seqs)

        def padded(token_lists):  # [rows, width], padded with the out-of-vocabulary id
            out = np.full((rows, max(1, max(len(t) for t in token_lists))), vocab, dtype=np.int64)
            for r, tokens in enumerate(token_lists):
                out[r, :len(tokens)] = tokens
            return out

        t = to_device(dict(
            output=padded([s.output_token_ids for s in seqs]), all=padded([s.token_ids for s in seqs]),
            rep=np.array([s.params.repetition_penalty for s in seqs], dtype=np.float64),
            presence=np.array([s.params.presence_penalty for s in seqs], dtype=np.float64),
            frequency=np.array([s.params.frequency_penalty for s in seqs], dtype=np.float64)), logits.device)

        def counts(ids):
            c = torch.zeros(rows, vocab + 1, device=logits.device)
            return c.scatter_add_(1, ids, torch.ones_like(ids, dtype=c.dtype))[:, :vocab]

        output_counts, seen = counts(t["output"]), counts(t["all"]) > 0
        rep, presence, frequency = (t[name].float().unsqueeze(1) for name in ("rep", "presence", "frequency"))
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        return logits - frequency * output_counts - presence * (output_counts > 0)

    @staticmethod
    def _inputs(logits, seqs, rows: list[int]) -> dict[str, torch.Tensor]:
        """The sampling rows' settings, on the device in one copy."""
        params = [s.params for s in seqs]
        t = to_device(dict(
            rows=np.array(rows), top_k=np.array([p.top_k for p in params]),
            seeds=np.array([s.seed for s in seqs]), positions=np.array([s.num_output_tokens for s in seqs]),
            temperature=np.array([p.temperature for p in params], dtype=np.float64),
            top_p=np.array([p.top_p for p in params], dtype=np.float64),
            min_p=np.array([p.min_p for p in params], dtype=np.float64)), logits.device)
        t["temperature"] = t["temperature"].float().unsqueeze(1)
        return t

    def _sample_top_k(self, logits, seqs, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sampling rows, their tokens) for rows with a top-k below the vocabulary:
        each row's k most likely tokens (topk's choice among ties at the k-th) are its
        candidates, and the rest of the step sees only them."""
        t = self._inputs(logits, seqs, rows)
        # sorted, most likely first; temperature keeps the order, so it divides only these
        top = logits.index_select(0, t["rows"]).topk(max(s.params.top_k for s in seqs), dim=-1)
        rank = torch.arange(top.values.shape[1], device=logits.device)
        candidates = top.values.div_(t["temperature"]).masked_fill_(rank >= t["top_k"].unsqueeze(1), float("-inf"))
        self._apply_floors(candidates, seqs, t)
        column = gumbel_argmax(candidates, t["seeds"], t["positions"], self.argmax, top.indices, self.noise)
        return t["rows"], top.indices.gather(1, column.unsqueeze(1)).squeeze(1)

    def _sample(self, logits, seqs, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sampling rows, their tokens) for rows without a top-k."""
        t = self._inputs(logits, seqs, rows)
        x = logits.index_select(0, t["rows"]).div_(t["temperature"])
        self._apply_floors(x, seqs, t)
        return t["rows"], gumbel_argmax(x, t["seeds"], t["positions"], self.argmax, noise=self.noise)

    @staticmethod
    def _apply_floors(x, seqs, t) -> None:
        """Drop, in place, what top-p and min-p leave out of each row of `x`."""
        params = [s.params for s in seqs]
        floor = None
        if any(p.top_p < 1.0 for p in params):
            floor = Sampler._top_p_floor(x, t["top_p"].float().unsqueeze(1))
        if any(p.min_p > 0.0 for p in params):
            # p >= min_p * p_max, in logits; log(0) = -inf sets no floor
            min_p_floor = x.amax(dim=-1, keepdim=True) + t["min_p"].float().log().unsqueeze(1)
            floor = min_p_floor if floor is None else torch.maximum(floor, min_p_floor)
        if floor is not None:
            x.masked_fill_(x < floor, float("-inf"))

    @staticmethod
    def _top_p_floor(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """[rows, 1]: the smallest logit top-p keeps. A token is dropped when the more
        likely tokens before it already reach top_p (ties with the floor are kept)."""
        sorted_x = x.sort(dim=-1, descending=True).values
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1).sub_(probs)
        num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True)
        return sorted_x.gather(1, num_kept - 1)
