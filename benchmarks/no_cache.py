"""The no-KV-cache baseline: static batches that recompute every sequence in full each step.

Without a KV cache, producing token t of a sequence means running all its previous
tokens through the model again, so a sequence of length L costs O(L^2) token-forwards
instead of O(L). This loop is that cost, measured honestly with the same model code:

- requests go in static batches of up to `max_num_seqs`, in order; a batch runs
  until its last sequence finishes, then the next batch starts;
- every step right-pads the batch to its longest sequence and runs the whole padded
  block through the model with plain causal attention (right padding is harmless: a
  real token never attends to the pads after it), then takes each sequence's last
  real hidden state, computes logits and picks the argmax (greedy only);
- a sequence that finished leaves the batch at once, which is kinder to the baseline
  than static batching that keeps computing it.
Stop rules match the engine's: max_tokens, EOS (unless ignored) and max_model_len.
"""

import time
from dataclasses import dataclass

import torch

from microvllm import RequestMetrics
from microvllm.model.attention import DenseCausalAttention
from microvllm.model.gpt import GPT


@dataclass
class NoCacheOutput:
    token_ids: list[int]
    metrics: RequestMetrics


@dataclass
class NoCacheResult:
    outputs: list[NoCacheOutput]   # in request order
    computed_tokens: int           # token-forwards run, padding included
    peak_batch_size: int


def _pack(seqs: list[list[int]], device: torch.device):
    """Right-padded [B*T] input ids, positions and previous ids, and each last real row."""
    lengths = torch.tensor([len(s) for s in seqs])
    batch, width = len(seqs), int(lengths.max())
    ids = torch.zeros(batch, width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    prev = torch.cat([torch.full((batch, 1), -1), ids[:, :-1]], dim=1)  # -1: no token before
    positions = torch.arange(width).repeat(batch)
    last_rows = torch.arange(batch) * width + lengths - 1
    return [t.to(device) for t in (ids.flatten(), positions, prev.flatten(), last_rows)]


@torch.inference_mode()
def generate_without_cache(model: GPT, prompts: list[list[int]], max_tokens: list[int],
                           max_num_seqs: int, max_model_len: int,
                           eos_token_ids: frozenset[int] = frozenset(), progress=None) -> NoCacheResult:
    """`progress`, a tqdm bar (or None), ticks once per finished request."""
    device = model.cos.device  # a buffer: packed CPU linears keep no .weight
    start = time.time()  # every request arrives at the start, as with LLM.generate
    outputs: list[NoCacheOutput | None] = [None] * len(prompts)
    computed = peak = 0
    for first in range(0, len(prompts), max_num_seqs):
        active = list(range(first, min(first + max_num_seqs, len(prompts))))
        peak = max(peak, len(active))
        tokens = {i: list(prompts[i]) for i in active}
        first_token_time: dict[int, float] = {}
        while active:
            ids, positions, prev, last_rows = _pack([tokens[i] for i in active], device)
            hidden = model(ids, positions, prev, DenseCausalAttention(len(active)))
            next_ids = model.compute_logits(hidden[last_rows]).argmax(dim=-1).tolist()
            computed += ids.numel()
            now = time.time()
            still_running = []
            for i, token in zip(active, next_ids):
                tokens[i].append(token)
                first_token_time.setdefault(i, now)
                num_output = len(tokens[i]) - len(prompts[i])
                if num_output >= max_tokens[i] or token in eos_token_ids or len(tokens[i]) >= max_model_len:
                    outputs[i] = NoCacheOutput(tokens[i][len(prompts[i]):],
                                               RequestMetrics(start, first_token_time[i], now))
                    if progress is not None:
                        progress.update(1)
                else:
                    still_running.append(i)
            active = still_running
            if progress is not None:
                progress.set_postfix_str(f"{computed:,} token-forwards", refresh=False)
    if progress is not None:
        progress.close()
    return NoCacheResult(outputs, computed, peak)
