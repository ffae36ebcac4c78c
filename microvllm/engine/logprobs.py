"""Log-probs: of sampled tokens, of prompt tokens, and the top-k entries that carry them.

Sampled tokens: the sampler reads one `logprob_table` back per step (`LogprobRows`),
and a request that asked for log-probs holds a `SampledLogprobs` feature that turns its
row into an entry as the step decides and appends it as the step commits.

Prompt tokens: the model runner computes the log-probs of the prompt tokens a prefill
chunk predicts (`prompt_logprobs_of`), the output processor turns them into entries
(`new_prompt_entries`), and cached blocks keep them for later requests with the same
prefix: `keep_on_blocks` stores a request's entries on its cached full blocks (each
entry is a function of the tokens up to it, so of the block's hash), and
`reusable_blocks` says how much of a cached prefix a request may reuse while it still
lacks entries, reading those it can off the cached blocks.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..outputs import Logprob
from ..tokenizer import Tokenizer
from .request_feature import RequestFeature, TokenUpdate
from .sequence import Request, Sequence
from .transfer import to_device

# prompt log-probs are computed this many positions at a time, so a long prefill
# chunk never holds [chunk, vocab] float32 logits at once
PROMPT_LOGPROBS_CHUNK = 256


def logprob_table(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, 3 + 2k] float64: token id, its log-prob under softmax(logits), its rank,
    then the top k ids and their log-probs; one table, so it is read back in one copy
    (ids and ranks below 2^53 are exact)."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    top = logprobs.topk(k, dim=-1)
    return torch.cat([token_ids.unsqueeze(1).double(), chosen.double(), ranks.double(),
                      top.indices.double(), top.values.double()], dim=1)


@dataclass
class LogprobRows:
    """logprob_table read back, per row: the token, its log-prob and rank, and the top k."""
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]                    # 1 = the most likely token
    top_ids: list[list[int]]            # k per row (empty lists for k = 0)
    top_logprobs: list[list[float]]

    @classmethod
    def read(cls, table: torch.Tensor, k: int) -> "LogprobRows":
        rows = table.tolist()
        return cls([int(r[0]) for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows],
                   [[int(t) for t in r[3:3 + k]] for r in rows], [r[3 + k:] for r in rows])


def logprob_entry(rows: LogprobRows, i: int, token: int, tokenizer: Tokenizer) -> dict[int, Logprob]:
    """Row i as the caller sees it: the top k tokens by rank, and `token` with its own."""
    decode = lambda t: tokenizer.decode([t], skip_special_tokens=False)
    entry = {t: Logprob(lp, r + 1, decode(t))
             for r, (t, lp) in enumerate(zip(rows.top_ids[i], rows.top_logprobs[i]))}
    entry[token] = Logprob(rows.logprobs[i], rows.ranks[i], decode(token))
    return entry


# -- sampled tokens ---------------------------------------------------------------------

class SampledLogprobs(RequestFeature):
    """SamplingParams.logprobs: each sampled token's log-prob and entry, and their sum.
    They live on the Sequence (its output record); tokens a tool forced get None."""
    every_token = True

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def on_token(self, seq: Sequence, token: int, update: TokenUpdate, logprobs: LogprobRows, row: int) -> None:
        update.logprob = logprobs.logprobs[row]
        update.logprob_entry = logprob_entry(logprobs, row, token, self.tokenizer)

    def commit(self, seq: Sequence, update: TokenUpdate) -> None:
        seq.cumulative_logprob += update.logprob
        seq.logprobs.append(update.logprob_entry)
        if update.forced:  # forced tokens were not sampled: no log-probs
            seq.logprobs += [None] * len(update.forced)


# -- prompt tokens ----------------------------------------------------------------------

@dataclass
class PromptLogprobs:
    """What one prefill chunk's positions say of the prompt tokens they predict."""
    request: Request
    first_index: int                        # the prompt position of rows' first entry
    rows: LogprobRows


def start_prompt_logprobs(request: Request) -> None:
    """Give a request that asked for prompt log-probs the entries known before any step."""
    if request.params.prompt_logprobs is not None:
        # the first token has no predecessor; tokens before the start are not asked for
        request.prompt_logprobs = [None] * max(1, min(request.params.prompt_logprobs_start,
                                                      len(request.prompt_token_ids)))


def wants_prompt_logprobs(seq: Sequence) -> bool:
    """Whether a step computing `seq` computes prompt log-probs (of its request's first sample)."""
    request = seq.request
    return (request.prompt_logprobs is not None and seq.index == 0
            and len(request.prompt_logprobs) < seq.num_prompt_tokens)


def prompt_logprobs_of(seq: Sequence, num_new_tokens: int, hidden: torch.Tensor, first_row: int,
                       compute_logits, device: torch.device) -> PromptLogprobs:
    """Log-probs of the prompt tokens that a chunk of `num_new_tokens` (hidden rows from
    `first_row`) predicts, but for those known already (not asked for, or read from the
    prefix cache): no logits for them."""
    k = seq.params.prompt_logprobs
    # position p predicts prompt token p + 1
    start = max(seq.num_computed_tokens, len(seq.request.prompt_logprobs) - 1)
    end = min(seq.num_computed_tokens + num_new_tokens, seq.num_prompt_tokens - 1)
    if end <= start:
        return PromptLogprobs(seq.request, start + 1, LogprobRows([], [], [], [], []))
    first_row += start - seq.num_computed_tokens
    targets = to_device(dict(t=np.array(seq.token_ids[start + 1:end + 1])), device)["t"]
    chunk_hidden = hidden[first_row:first_row + end - start].split(PROMPT_LOGPROBS_CHUNK)
    tables = [logprob_table(compute_logits(h), t, k)
              for h, t in zip(chunk_hidden, targets.split(PROMPT_LOGPROBS_CHUNK))]
    return PromptLogprobs(seq.request, start + 1, LogprobRows.read(torch.cat(tables), k))


def new_prompt_entries(chunk: PromptLogprobs, tokenizer: Tokenizer) -> list[dict[int, Logprob]]:
    """The entries a chunk adds to its request's prompt log-probs: it computes only those
    after the known ones, and the block manager reuses cached KV only where every entry
    before the chunk is known."""
    request, rows, first = chunk.request, chunk.rows, chunk.first_index
    assert first == len(request.prompt_logprobs), "prompt log-prob entries computed out of order"
    return [logprob_entry(rows, i, request.prompt_token_ids[first + i], tokenizer)
            for i in range(len(rows.logprobs))]


# -- prompt log-probs on cached blocks ---------------------------------------------------
# `blocks`: the block manager's Blocks, by id; each keeps `prompt_logprobs` (the entries
# of its tokens, top `prompt_logprobs_k` each) while it is a cached prefix. A request
# that asks for prompt log-probs reuses cached KV only as far as the entries it still
# lacks can be read off cached blocks: up to and including the first token it
# computes, whose entry the position before it (reused, not computed) predicted.

def top_k_entry(entry: dict, token: int, k: int) -> dict:
    """A prompt log-prob entry kept with more top tokens, cut to the top `k` and `token`."""
    return {t: logprob for t, logprob in entry.items() if logprob.rank <= k or t == token}


def reusable_blocks(seq: Sequence, hits: list[int], blocks: list, block_size: int) -> int:
    """How many of the cached blocks `hits` (ids of `seq`'s leading full blocks in
    `blocks`) `seq` may reuse as far as prompt log-probs go: all, unless its request
    still lacks some entries; then, reusing j blocks, the entries of tokens up to
    j * block_size must come from cached blocks. Appends those entries to the request's."""
    entries = seq.request.prompt_logprobs
    if entries is None or len(entries) >= seq.num_prompt_tokens:
        return len(hits)
    bs, k = block_size, seq.params.prompt_logprobs
    known = len(entries)
    first_lacking = known // bs  # the first block whose entries are needed
    while first_lacking < len(hits) and blocks[hits[first_lacking]].prompt_logprobs_k >= k:
        first_lacking += 1
    # j blocks need block j's entries (token j * bs) unless that token's entry is known
    reuse = min(len(hits), max(first_lacking - 1, (known - 1) // bs))
    for t in range(known, reuse * bs + 1):
        block = blocks[hits[t // bs]]
        entries.append(top_k_entry(block.prompt_logprobs[t % bs], seq.token_ids[t], k))
    return reuse


def keep_on_blocks(seq: Sequence, blocks: list, block_size: int) -> None:
    """Keep, on `seq`'s cached full blocks, the prompt log-prob entries its request has
    for all of their tokens."""
    entries, k, bs = seq.request.prompt_logprobs, seq.params.prompt_logprobs, block_size
    for i in range(min(len(entries) // bs, seq.num_registered_blocks)):
        block = blocks[seq.block_table[i]]
        block_entries = entries[i * bs:(i + 1) * bs]
        if (block.hash == seq.block_hashes[i] and block.prompt_logprobs_k < k
                and all(block_entries[1 if i == 0 else 0:])):
            block.prompt_logprobs, block.prompt_logprobs_k = tuple(block_entries), k
