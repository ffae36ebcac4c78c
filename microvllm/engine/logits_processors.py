"""The per-request logits shaping of SamplingParams: allowed_token_ids, bad_words and
user logits_processors, applied before penalties and sampling (log-probs stay those of
the model's own distribution).

A step pays for this only when one of its sequences asked for it: the sampler calls
`shape_logits` only then, and it shapes only those sequences' rows, one at a time, in
Python: a user function is called per sequence, as its vLLM signature says (a 1-D
logits row, the token ids so far).
"""

import torch

from ..sampling_params import logits_processor_arity
from ..tokenizer import Tokenizer
from .sequence import Request, Sequence


def prepare(request: Request, tokenizer: Tokenizer) -> None:
    """Token forms of the request's bad words: each word alone and after a space, as it
    would be tokenized mid-sentence."""
    words = request.params.bad_words or ()
    forms = {tuple(tokenizer.encode(prefix + w.strip(), prepend_bos=False)) for w in words for prefix in ("", " ")}
    request.bad_word_ids = sorted(forms)


def shape_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [(row, seq) for row, seq in enumerate(seqs) if seq.request.params.shapes_logits]
    if not rows:
        return logits
    logits = logits.clone()  # the caller keeps the raw logits for log-probs
    for row, seq in rows:
        logits[row] = _shape_row(logits[row], seq)
    return logits


def _shape_row(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    output_ids = seq.output_token_ids
    if p.allowed_token_ids:
        keep = torch.zeros_like(row, dtype=torch.bool)
        keep[torch.tensor(p.allowed_token_ids, device=row.device)] = True
        row = row.masked_fill(~keep, float("-inf"))
    banned = [ids[-1] for ids in seq.request.bad_word_ids
              if len(ids) == 1 or tuple(output_ids[-(len(ids) - 1):]) == ids[:-1]]
    if banned:
        row = row.index_fill(0, torch.tensor(banned, device=row.device), float("-inf"))
    for f in p.logits_processors or ():
        prompt_ids = seq.token_ids[:seq.num_prompt_tokens]
        row = f(prompt_ids, output_ids, row) if logits_processor_arity(f) == 3 else f(output_ids, row)
    return row
