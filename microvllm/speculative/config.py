"""SpeculativeConfig: LLM(speculative_config=...) checked (factory.py builds the proposer it asks for).

Spelt as vLLM's: `{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
"prompt_lookup_max": b}` guesses by prompt lookup (ngram.py); `{"model": DIR,
"num_speculative_tokens": k}` (method "draft_model", implied by "model") guesses with a
smaller checkpoint that shares the target's tokenizer (draft.py). As in vLLM, a lookup
bound left out takes the other's value, and both default to 5.
"""

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
# vLLM's other methods: they need model parts nanochat checkpoints do not have
UNSUPPORTED_METHODS = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "deepseek_mtp", "ernie_mtp",
                       "qwen3_next_mtp", "mimo_mtp", "longcat_flash_mtp", "suffix")
KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model")
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_PROMPT_LOOKUP = 5
MAX_PROMPT_LOOKUP = 64


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str                         # "ngram" or "draft_model"
    num_speculative_tokens: int         # guesses per sequence and step, at most
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP  # ngram: the n-gram lengths matched
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    model: str | None = None            # draft_model: the draft checkpoint's dir


def _field(key: str) -> str:
    return f"speculative_config.{key}"


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """The checked config of a speculative_config dict (None: no speculation)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                        f"'num_speculative_tokens': 4}}, got {type(value).__name__}")
    unknown = sorted(map(str, set(value) - set(KEYS)))
    if unknown:
        raise ValueError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(KEYS)}")
    model = value.get("model")
    method = value.get("method", "draft_model" if model is not None else None)
    if method in UNSUPPORTED_METHODS:
        raise ValueError(f"{_field('method')}={method!r} is not supported: use one of {', '.join(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"{_field('method')}={method!r}: must be one of {', '.join(map(repr, METHODS))} "
                         "(or give 'model' for a draft model)")
    k = value.get("num_speculative_tokens")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"{_field('num_speculative_tokens')}={k!r}: must be an int in "
                         f"[1, {MAX_SPECULATIVE_TOKENS}]")
    if method == "draft_model":
        if not isinstance(model, str) or not model:
            raise ValueError(f"{_field('model')}={model!r}: method 'draft_model' needs the draft "
                             "checkpoint's directory (a str)")
        for key in ("prompt_lookup_min", "prompt_lookup_max"):
            if key in value:
                raise ValueError(f"{_field(key)} applies to method 'ngram' only")
        return SpeculativeConfig(method, k, model=model)
    if model is not None:
        raise ValueError(f"{_field('model')} applies to method 'draft_model' only, not 'ngram'")
    low, high = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
    low = high if low is None else low
    high = low if high is None else high
    low = DEFAULT_PROMPT_LOOKUP if low is None else low
    high = DEFAULT_PROMPT_LOOKUP if high is None else high
    for key, n in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROMPT_LOOKUP:
            raise ValueError(f"{_field(key)}={n!r}: must be an int in [1, {MAX_PROMPT_LOOKUP}]")
    if low > high:
        raise ValueError(f"{_field('prompt_lookup_min')}={low} must be <= "
                         f"{_field('prompt_lookup_max')}={high}")
    return SpeculativeConfig(method, k, low, high)
