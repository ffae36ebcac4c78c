"""The engine's outputs as they cross the pipe to the server: plain tuples.

A step of a few hundred streams sends a few hundred RequestOutputs. Pickled as
dataclasses, each costs about 12 us to pickle and unpickle, mostly spent building
objects from their field dicts; as tuples of their fields, under 1 us. The prompt's
token ids stay behind: the server has them already.
"""

from ..outputs import CompletionOutput, RequestMetrics, RequestOutput

# (request id, prompt log-probs, completions' fields, finished, metrics' fields, cached tokens)
PackedOutput = tuple


def packed(output: RequestOutput, with_prompt_logprobs: bool = True) -> PackedOutput:
    """`with_prompt_logprobs` False: they stay behind (a stream's later outputs repeat them)."""
    m = output.metrics
    return (output.request_id, output.prompt_logprobs if with_prompt_logprobs else None,
            [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason,
              c.token_masks) for c in output.outputs],
            output.finished, (m.arrival_time, m.first_token_time, m.finished_time), output.num_cached_tokens)


def unpacked(output: PackedOutput, prompt_token_ids: list[int]) -> RequestOutput:
    """The RequestOutput that `packed` made `output` of (the server sends token ids, so the
    prompt's text is None)."""
    request_id, prompt_logprobs, completions, finished, metrics, num_cached_tokens = output
    return RequestOutput(request_id, None, prompt_token_ids, prompt_logprobs,
                         [CompletionOutput(*c) for c in completions], finished, RequestMetrics(*metrics),
                         num_cached_tokens)
