"""Prompts: the forms a caller may pass, parsed into token ids and checked once, at the
facade, against the engine's limits (the engine trusts what it is given)."""

import numbers
from typing import Required, TypedDict

from .sampling_params import SamplingParams
from .structured import grammars
from .tokenizer import Tokenizer
from .validation import check_type


class TextPrompt(TypedDict):
    """A text prompt, as vLLM's: {"prompt": str}; tokenized with <|bos|> first."""
    prompt: str


class TokensPrompt(TypedDict, total=False):
    """A prompt of token ids, as vLLM's: {"prompt_token_ids": [int, ...]}, run as given;
    an optional "prompt" is their text, reported as the output's prompt."""
    prompt_token_ids: Required[list[int]]
    prompt: str


PROMPT_FORMS = "a str, a {'prompt': str} or {'prompt_token_ids': [int, ...]} dict, or a list of token ids"


def parse_prompts(prompts, tokenizer: Tokenizer) -> list[tuple[str | None, list[int]]]:
    """One prompt or a list of them, each parsed into (text or None, token ids)."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                           and not isinstance(prompts[0], (str, dict, list, tuple))):
        prompts = [prompts]
    check_type("prompts", prompts, (list, tuple), f"a prompt or a list of prompts ({PROMPT_FORMS})")
    return [parse_prompt(p, tokenizer) for p in prompts]


def parse_prompt(prompt, tokenizer: Tokenizer) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" not in prompt and not isinstance(prompt.get("prompt"), str):
            raise ValueError(f"a prompt dict needs a str 'prompt' or a list 'prompt_token_ids'; "
                             f"got {_short_repr(prompt)}")
        # vLLM's other keys (multi_modal_data, cache_salt, ...) would change the request: never dropped unread
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
        if unknown:
            raise ValueError(f"prompt dict keys {unknown} are not supported: a prompt dict holds 'prompt' "
                             "(text) and/or 'prompt_token_ids'; nanochat models take text only")
        text = prompt.get("prompt")
        if text is not None:
            check_type("prompt", text, str, "a str")
        if "prompt_token_ids" not in prompt:
            return text, tokenizer.encode(text)
        # as in vLLM, a TokensPrompt's 'prompt' is the text of its ids, which run as given
        return text, list(check_type("prompt_token_ids", prompt["prompt_token_ids"], (list, tuple),
                                     "a list of token ids"))
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise TypeError(f"a prompt must be {PROMPT_FORMS}; got {type(prompt).__name__}")


def checked_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                   max_model_len: int) -> list[int]:
    """The token ids the engine runs (truncated as params ask, numpy ints made Python ones),
    or the error that names what is wrong with them, or with params' constraint, and what is allowed."""
    check_type("sampling_params", params, SamplingParams, "a SamplingParams")
    k = params.truncate_prompt_tokens
    token_ids = list(prompt_token_ids) if k is None else list(prompt_token_ids)[-k:]
    if not token_ids:
        raise ValueError("prompt is empty: give at least one token")
    bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if bad:
        raise TypeError(f"prompt token ids must be ints, got {bad[0]!r}")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is out of vocabulary: ids must be in [0, {vocab_size})")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(token_ids)} tokens; it must be shorter than "
                         f"max_model_len={max_model_len} to leave room for output")
    for name in ("stop_token_ids", "allowed_token_ids"):
        bad = [t for t in getattr(params, name) or () if t >= vocab_size]
        if bad:
            raise ValueError(f"{name} {bad} are out of vocabulary: ids must be in [0, {vocab_size})")
    if params.structured_outputs is not None:
        grammars.check(params.structured_outputs)
    return [int(t) for t in token_ids]


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
