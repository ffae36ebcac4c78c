"""ModelRunner: turns a scheduled step into tensors, runs the model once, samples.

The flat batch puts single-token sequences (decodes) first, then fresh prompts' first
chunks, then chunks that continue a computed prefix, each kind sorted by context
length, so the attention backend can pad similar neighbours together. Index arrays are
built with numpy from the sequences' block tables, then moved to the device in one copy.
A step of single-token sequences replays a CUDA graph when the engine captured them
(DecodeGraphs); any other step runs eagerly.

An item may carry guesses (ScheduledSequence.guesses, a proposer's): its chunk is its
one new token followed by them, and it samples at all of those `1 + len(guesses)` rows,
row j seeing the sequence as it would be after the first j guesses (speculative/ahead.py).
Attention sees each of those rows as a decode of its own (one query, the context up to
it, the sequence's blocks), so each is computed exactly as a plain decode of that
position would be (through the decode graphs too, where the rows fit them), and the
output does not depend on whether guesses were checked; a backend whose chunk rows are
exact decodes already (AttentionBackend.exact_chunk_rows: the CPU kernel) takes the
chunk whole and reads the context once for all its rows.
Steps without guesses take the plain path, whose cost does not change.
"""

import time
from dataclasses import dataclass
from itertools import chain, compress

import numpy as np
import torch

from ..model.attention import AttentionBackend
from ..model.gpt import GPT
from ..speculative.ahead import SequenceAhead, rows_ahead
from .cuda_graphs import DecodeGraphs
from .kv_cache import PagedKVCache, SequenceKVView
from .logprobs import PromptLogprobs, prompt_logprobs_of, wants_prompt_logprobs
from .sampler import SampledTokens, Sampler, distinct_params
from .scheduler import ScheduledSequence
from .sequence import Sequence
from .stats import StepTimer
from .transfer import to_device

# the sort keys of the batch's kinds of sequence lie this far apart, past any context length
BATCH_KIND_STRIDE = 1 << 40


def _batch_order(item: ScheduledSequence) -> int:
    """Decodes, then fresh prompts, then continued ones, each by context length (an int
    key: tuples compare slower)."""
    computed = item.seq.num_computed_tokens
    kind = 0 if item.num_new_tokens == 1 else 1 if computed == 0 else 2
    return kind * BATCH_KIND_STRIDE + computed + item.num_new_tokens


# what an eager step sends the device, in its one copy
EAGER_INPUTS = ("input_ids", "positions", "prev_ids", "slot_mapping", "block_tables",
                "cu_query_lens", "cu_context_lens")


@dataclass
class StepOutput:
    sampled_seqs: list[ScheduledSequence]   # in the order of `sampled` rows (an item with guesses: 1 + g rows)
    sampled: SampledTokens | None
    prompt_logprobs: list[PromptLogprobs]   # of the sequences computing them this step
    forward_seconds: float                  # model forward and logits (host side on CUDA)
    device_seconds: float | None = None     # the whole step's device work, when timed
    # in a step that checks guesses: each sampled row's view of its sequence, as sampled
    row_views: list[Sequence | SequenceAhead] | None = None


def check_finite(hidden: torch.Tensor) -> None:
    if not bool(torch.isfinite(hidden).all()):
        raise FloatingPointError("float16 overflowed in the model's activations; "
                                 "run with dtype='bfloat16' or 'float32'")


def int_array(values: list[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64, count=len(values))  # faster than np.array


def cumulative(lens: np.ndarray) -> np.ndarray:
    """[0, lens[0], lens[0] + lens[1], ...]: where each sequence's rows start, and the end."""
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    lens.cumsum(out=out[1:])
    return out


def one_query_per_guessed_row(inputs: dict, num_guesses: np.ndarray) -> dict:
    """The step's attention view with each item that has guesses split into one
    single-query sequence per token (its context ending at that token, its block table
    repeated); the flat batch of tokens, and so the KV writes, stay as they are."""
    parts = np.where(num_guesses > 0, num_guesses + 1, 1)  # attention sequences per item
    item = np.arange(len(parts)).repeat(parts)
    guessed = num_guesses[item] > 0
    row_in_item = np.arange(len(item)) - cumulative(parts)[:-1].repeat(parts)
    query_lens = np.where(guessed, 1, np.diff(inputs["cu_query_lens"])[item])
    context_lens = np.where(guessed, inputs["context_lens"][item] - num_guesses[item] + row_in_item,
                            inputs["context_lens"][item])
    return inputs | dict(block_tables=inputs["block_tables"][item], query_lens=query_lens.tolist(),
                         context_lens=context_lens, cu_query_lens=cumulative(query_lens),
                         cu_context_lens=cumulative(context_lens))


class ModelRunner:
    def __init__(self, model: GPT, kv_cache: PagedKVCache, attention_backend: AttentionBackend,
                 sampler: Sampler, device: torch.device, decode_graphs: DecodeGraphs | None = None,
                 timer: StepTimer | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.attention_backend = attention_backend
        self.sampler = sampler
        self.device = device
        self.decode_graphs = decode_graphs
        self.timer = timer
        # nanochat trains in bf16; relu(x)^2 can pass float16's 65504 on long contexts,
        # and the logit softcap would hide the damage, so a float16 engine looks before
        # sampling (the KV cache holds the activations' dtype)
        self.checks_overflow = kv_cache.k.dtype == torch.float16

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence], guessing: bool = False) -> StepOutput:
        """Run the step; `guessing`: some items carry guesses."""
        batch = sorted(scheduled, key=_batch_order)  # an item with guesses is a decode
        seqs = [s.seq for s in batch]
        if self.timer:
            self.timer.start()
        inputs = self._prepare(batch, seqs, guessing)
        ends = inputs["cu_query_lens"][1:]
        row_views = None
        if guessing:
            num_guesses = int_array([len(s.guesses) for s in batch])
            sampled_seqs, row_views, last_rows = self._guessed_rows(batch, inputs, num_guesses)
            # single queries replay the decode graphs; a backend whose chunk rows are exact
            # decodes needs them split for nothing else
            if self.decode_graphs or num_guesses.max() + 1 > self.attention_backend.exact_chunk_rows:
                inputs = one_query_per_guessed_row(inputs, num_guesses)
            every_token_samples = len(last_rows) == len(inputs["input_ids"])
            sampler_seqs = row_views
        else:
            # ScheduledSequence.samples for the whole batch: this step reaches the last token
            samples = inputs["context_lens"] == int_array([len(seq.token_ids) for seq in seqs])
            last_rows = ends[samples] - 1
            every_token_samples = len(last_rows) == len(inputs["input_ids"])  # decodes only
            sampled_seqs = batch if every_token_samples else list(compress(batch, samples))
            sampler_seqs = seqs if every_token_samples else [s.seq for s in sampled_seqs]
        start = time.perf_counter()
        # a step checking guesses is a decode step too where every item is a decode (its
        # rows split into single queries) and the rows fit the largest graph
        if self.decode_graphs and max(inputs["query_lens"]) == 1 and (
                not guessing or len(inputs["input_ids"]) <= self.decode_graphs.max_batch_size):
            hidden = self.decode_graphs.run(inputs)
            # a decode-only step samples every row unless a prompt's last chunks are a token long
            last_hidden = hidden if every_token_samples else \
                hidden[to_device(dict(rows=last_rows), self.device)["rows"]]
        else:
            hidden, rows = self._eager_forward(inputs, last_rows)
            last_hidden = hidden if every_token_samples else hidden[rows]
        logits = self.model.compute_logits(last_hidden)
        forward_seconds = time.perf_counter() - start
        sampled = None
        if sampled_seqs:
            if self.checks_overflow:
                check_finite(last_hidden)
            sampled = self.sampler(logits, sampler_seqs)
        prompt_logprobs = []
        if any(p.prompt_logprobs is not None for p in distinct_params(seqs)):
            prompt_logprobs = [
                prompt_logprobs_of(s.seq, s.num_new_tokens, hidden, end - s.num_new_tokens,
                                   self.model.compute_logits, self.device)
                for s, end in zip(batch, ends.tolist()) if wants_prompt_logprobs(s.seq)]
        return StepOutput(sampled_seqs, sampled, prompt_logprobs, forward_seconds,
                          self.timer.stop() if self.timer else None, row_views)

    @staticmethod
    def _guessed_rows(batch: list[ScheduledSequence], inputs: dict,
                      num_guesses: np.ndarray) -> tuple[list, list, np.ndarray]:
        """(the item of each sampled row, the row's view of its sequence, the rows) in a
        step that checks guesses (`num_guesses` per item): an item that samples does so
        at its last 1 + g rows."""
        samples = inputs["context_lens"] == int_array([len(s.seq.token_ids) for s in batch]) + num_guesses
        counts = num_guesses[samples] + 1
        firsts = inputs["cu_query_lens"][1:][samples] - counts
        rows = np.repeat(firsts, counts) + np.arange(counts.sum()) - np.repeat(cumulative(counts)[:-1], counts)
        sampled = list(compress(batch, samples))
        items = list(chain.from_iterable([s] * (1 + len(s.guesses)) for s in sampled))
        views = list(chain.from_iterable(rows_ahead(s.seq, list(s.guesses)) for s in sampled))
        return items, views, rows

    def _prepare(self, batch: list[ScheduledSequence], seqs: list[Sequence], guessing: bool) -> dict[str, np.ndarray]:
        # per-sequence values are read in a few list comprehensions, the rest is numpy's C
        # functions and methods: after a forward every function the step calls starts cold,
        # and numpy's Python-level wrappers (np.cumsum, .max, ...) cost more than the work
        bs = self.kv_cache.block_size
        query_lens = ([s.num_new_tokens + len(s.guesses) for s in batch] if guessing
                      else [s.num_new_tokens for s in batch])
        starts = [seq.num_computed_tokens for seq in seqs]
        # per sequence: the token before its chunk (-1 at position 0, for smear), then the chunk
        chunks = [seq.token_ids[start - 1:start + n] if start else [-1, *seq.token_ids[:n]]
                  for seq, start, n in zip(seqs, starts, query_lens)]
        if guessing:  # the slices stop at the sequence's last token: its guesses follow it
            for chunk, item in zip(chunks, batch):
                chunk += item.guesses
        window = np.fromiter(chain.from_iterable(chunks), dtype=np.int64)
        lens, first_positions = int_array(query_lens), int_array(starts)
        cu_query_lens = cumulative(lens)
        seq_index = np.arange(len(batch)).repeat(lens)  # of each token of the flat batch
        token_index = np.arange(len(seq_index))
        positions = (first_positions - cu_query_lens[:-1]).repeat(lens) + token_index
        # token i of the flat batch is window[i + seq_index[i] + 1]; the one before it precedes it
        prev_index = token_index + seq_index
        tables = [seq.block_table for seq in seqs]
        table_lens = [len(table) for table in tables]
        block_tables = np.zeros((len(batch), max(table_lens)), dtype=np.int64)
        # the mask's cells in row-major order are the tables' entries laid end to end
        block_tables[np.arange(block_tables.shape[1]) < int_array(table_lens)[:, None]] = np.frombuffer(
            b"".join(tables), dtype=np.int64)
        block_index, offset = np.divmod(positions, bs)
        context_lens = first_positions + lens
        return dict(input_ids=window[prev_index + 1], positions=positions, prev_ids=window[prev_index],
                    slot_mapping=block_tables[seq_index, block_index] * bs + offset,
                    block_tables=block_tables, query_lens=query_lens, context_lens=context_lens,
                    cu_query_lens=cu_query_lens, cu_context_lens=cumulative(context_lens))

    def _eager_forward(self, inputs: dict, last_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of the step's tokens, the rows that sample) on the device."""
        t = to_device({name: inputs[name] for name in EAGER_INPUTS} | {"last_rows": last_rows}, self.device)
        view = SequenceKVView(self.kv_cache, t["slot_mapping"], t["block_tables"], inputs["query_lens"],
                              inputs["context_lens"].tolist(), t["cu_query_lens"], t["cu_context_lens"])
        hidden = self.model(t["input_ids"], t["positions"], t["prev_ids"], self.attention_backend.step(view))
        return hidden, t["last_rows"]
