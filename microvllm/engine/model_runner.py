"""ModelRunner: turns a scheduled step into tensors, runs the model once, samples.

The flat batch puts single-token sequences (decodes) first, then fresh prompts' first
chunks, then chunks that continue a computed prefix, each kind sorted by context
length, so the attention backend can pad similar neighbours together. Index arrays are
built with numpy from the sequences' block tables, then moved to the device in one copy. A step of single-token sequences replays a CUDA graph
when the engine captured them (DecodeGraphs); any other step runs eagerly.
"""

import time
from dataclasses import dataclass
from itertools import chain, compress

import numpy as np
import torch

from ..model.attention import AttentionBackend
from ..model.gpt import GPT
from .cuda_graphs import DecodeGraphs
from .kv_cache import PagedKVCache, SequenceKVView
from .sampler import PROMPT_LOGPROBS_CHUNK, LogprobRows, SampledTokens, Sampler, distinct_params, logprob_table
from .scheduler import ScheduledSequence
from .sequence import Request, Sequence
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
class PromptLogprobs:
    """What one prefill chunk's positions say of the prompt tokens they predict."""
    request: Request
    first_index: int                        # the prompt position of rows' first entry
    rows: LogprobRows


@dataclass
class StepOutput:
    sampled_seqs: list[ScheduledSequence]   # in the order of `sampled` rows
    sampled: SampledTokens | None
    prompt_logprobs: list[PromptLogprobs]   # of the sequences computing them this step
    forward_seconds: float                  # model forward and logits (host side on CUDA)
    device_seconds: float | None = None     # the whole step's device work, when timed


def int_array(values: list[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64, count=len(values))  # faster than np.array


def cumulative(lens: np.ndarray) -> np.ndarray:
    """[0, lens[0], lens[0] + lens[1], ...]: where each sequence's rows start, and the end."""
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    lens.cumsum(out=out[1:])
    return out


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

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> StepOutput:
        batch = sorted(scheduled, key=_batch_order)  # the attention backend groups neighbours
        seqs = [s.seq for s in batch]
        if self.timer:
            self.timer.start()
        inputs = self._prepare(batch, seqs)
        ends = inputs["cu_query_lens"][1:]
        # ScheduledSequence.samples for the whole batch: this step reaches the last token
        samples = inputs["context_lens"] == int_array([len(seq.token_ids) for seq in seqs])
        last_rows = ends[samples] - 1
        every_token_samples = len(last_rows) == len(inputs["input_ids"])  # decodes only
        sampled_seqs = batch if every_token_samples else list(compress(batch, samples))
        start = time.perf_counter()
        if self.decode_graphs and max(inputs["query_lens"]) == 1:
            hidden = self.decode_graphs.run(inputs)
            # a decode-only step samples every row unless a prompt's last chunks are a token long
            last_hidden = hidden if every_token_samples else hidden[to_device(dict(rows=last_rows), self.device)["rows"]]
        else:
            hidden, rows = self._eager_forward(inputs, last_rows)
            last_hidden = hidden if every_token_samples else hidden[rows]
        logits = self.model.compute_logits(last_hidden)
        forward_seconds = time.perf_counter() - start
        sampled = None
        if sampled_seqs:
            self._check_finite(last_hidden)
            sampled = self.sampler(logits, seqs if every_token_samples else [s.seq for s in sampled_seqs])
        prompt_logprobs = []
        if any(p.prompt_logprobs is not None for p in distinct_params(seqs)):
            prompt_logprobs = [self._prompt_logprobs(s, hidden, end - s.num_new_tokens)
                               for s, end in zip(batch, ends.tolist()) if self._wants_prompt_logprobs(s)]
        return StepOutput(sampled_seqs, sampled, prompt_logprobs, forward_seconds,
                          self.timer.stop() if self.timer else None)

    def _check_finite(self, hidden: torch.Tensor) -> None:
        # nanochat trains in bf16; relu(x)^2 can pass float16's 65504 on long contexts,
        # and the logit softcap would hide the damage, so look before sampling
        if hidden.dtype == torch.float16 and not bool(torch.isfinite(hidden).all()):
            raise FloatingPointError("float16 overflowed in the model's activations; "
                                     "run with dtype='bfloat16' or 'float32'")

    def _prepare(self, batch: list[ScheduledSequence], seqs: list[Sequence]) -> dict[str, np.ndarray]:
        # per-sequence values are read in a few list comprehensions, the rest is numpy's C
        # functions and methods: after a forward every function the step calls starts cold,
        # and numpy's Python-level wrappers (np.cumsum, .max, ...) cost more than the work
        bs = self.kv_cache.block_size
        query_lens = [s.num_new_tokens for s in batch]
        starts = [seq.num_computed_tokens for seq in seqs]
        # per sequence: the token before its chunk (-1 at position 0, for smear), then the chunk
        window = np.fromiter(chain.from_iterable([
            seq.token_ids[start - 1:start + n] if start else [-1, *seq.token_ids[:n]]
            for seq, start, n in zip(seqs, starts, query_lens)]), dtype=np.int64)
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

    @staticmethod
    def _wants_prompt_logprobs(s: ScheduledSequence) -> bool:
        request = s.seq.request
        return (request.prompt_logprobs is not None and s.seq.index == 0
                and len(request.prompt_logprobs) < s.seq.num_prompt_tokens)

    def _prompt_logprobs(self, s: ScheduledSequence, hidden, first_row: int) -> PromptLogprobs:
        """Log-probs of the prompt tokens that this chunk's positions predict, but for those
        known already (not asked for, or read from the prefix cache): no logits for them."""
        seq, k = s.seq, s.seq.params.prompt_logprobs
        # position p predicts prompt token p + 1
        start = max(seq.num_computed_tokens, len(seq.request.prompt_logprobs) - 1)
        end = min(seq.num_computed_tokens + s.num_new_tokens, seq.num_prompt_tokens - 1)
        if end <= start:
            return PromptLogprobs(seq.request, start + 1, LogprobRows([], [], [], [], []))
        first_row += start - seq.num_computed_tokens
        targets = to_device(dict(t=np.array(seq.token_ids[start + 1:end + 1])), self.device)["t"]
        chunk_hidden = hidden[first_row:first_row + end - start].split(PROMPT_LOGPROBS_CHUNK)
        tables = [logprob_table(self.model.compute_logits(h), t, k)
                  for h, t in zip(chunk_hidden, targets.split(PROMPT_LOGPROBS_CHUNK))]
        return PromptLogprobs(seq.request, start + 1, LogprobRows.read(torch.cat(tables), k))
