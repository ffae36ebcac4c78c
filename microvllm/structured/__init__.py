"""Structured outputs: a request's output held to a JSON schema, a regex, a choice or a grammar.

`params.py` states the constraint (vLLM's StructuredOutputsParams); `grammars.py`
parses it, compiles it against the tokenizer once per distinct constraint and hands
each sequence its matcher; `bitmasks.py` is the sampler's step: the constrained rows'
allowed tokens, applied to the logits in one batched operation. The engine's
StructuredOutput feature holds each sequence's matcher and advances it as each token
is committed. Built on xgrammar, the `structured` extra.
"""

from .params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
