"""Joining a request's DELTA outputs: several steps' news as if they had come in one."""

from dataclasses import replace

from ..outputs import CompletionOutput, RequestOutput


def joined_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """One output holding what `outputs` (one request's, in order) add up to: texts, token
    ids, log-probs and masks joined; the prompt log-probs that came (only a stream's first
    output carries them); finish state and the rest from the last."""
    if len(outputs) == 1:
        return outputs[0]
    completions = {}
    for output in outputs:
        for c in output.outputs:
            before = completions.get(c.index)
            completions[c.index] = c if before is None else _joined(before, c)
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return replace(outputs[-1], prompt_logprobs=prompt_logprobs, outputs=[completions[i] for i in sorted(completions)])


def _joined(a: CompletionOutput, b: CompletionOutput) -> CompletionOutput:
    return replace(b, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
                   logprobs=None if b.logprobs is None else (a.logprobs or []) + b.logprobs,
                   token_masks=None if b.token_masks is None else (a.token_masks or []) + b.token_masks)
