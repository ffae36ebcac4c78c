"""SamplingParams and BeamSearchParams: how tokens are chosen, validated on creation."""

import enum
import inspect
from dataclasses import dataclass, field, fields
from typing import Callable

from . import unsupported
from .structured.params import StructuredOutputsParams
from .validation import check_bool, check_int, check_int_list, check_real, check_type

MAX_LOGPROBS = 20
# below this, logits / temperature overflows float32 and softmax gives NaN; such a
# temperature means "the most likely token" anyway, so it samples greedily
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """What step() returns for a request as it runs (generate() always returns FINAL_ONLY)."""
    CUMULATIVE = 0   # at every step that adds tokens: the whole output so far
    DELTA = 1        # at every step that adds tokens: only what is new since the last output
    FINAL_ONLY = 2   # once, when the request finishes


@dataclass
class _SamplingFields:
    """SamplingParams' fields and checks; users build SamplingParams, below."""
    n: int = 1                          # independent samples of the same prompt
    temperature: float = 1.0            # 0 (or below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 or 0 = all tokens
    min_p: float = 0.0
    seed: int | None = None             # same seed, same tokens, whatever runs beside it
    max_tokens: int | None = 16         # None = until max_model_len
    min_tokens: int = 0                 # no EOS, stop id or stop string ends the first this many
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0     # > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0       # > 0 discourages tokens already generated
    frequency_penalty: float = 0.0      # ... in proportion to how often
    logprobs: int | None = None         # top log-probs returned per generated token
    prompt_logprobs: int | None = None  # top log-probs returned per prompt token
    # the first prompt position whose log-prob is wanted: earlier entries are None, and
    # their logits are never computed (a scoring request's context)
    prompt_logprobs_start: int = 0
    skip_special_tokens: bool = True
    detokenize: bool = True             # False: no text (token ids only); stop strings need text
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens
    bad_words: list[str] | None = None  # words never generated (logits_processors.py)
    allowed_token_ids: list[int] | None = None  # the only tokens that may be generated
    logits_processors: list[Callable] | None = None  # f(output_ids, logits) or f(prompt_ids, output_ids, logits)
    output_kind: RequestOutputKind | None = None  # None = the entry point's: see RequestOutputKind
    # nanochat's tool calls: "auto" = its calculator, None = off, or f(expression) -> str | None
    tools: str | Callable | None = "auto"
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice or grammar
    stop_strings: tuple[str, ...] = field(init=False, repr=False)
    shapes_logits: bool = field(init=False, repr=False)  # any of the three above set

    def __post_init__(self):
        self._validate()
        self.shapes_logits = bool(self.allowed_token_ids or self.bad_words or self.logits_processors)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def _validate(self):
        """Checks every field by type and range, and stores it normalised (numpy numbers
        become Python ones, `stop` a tuple of strings, `stop_token_ids` a list)."""
        self.n = check_int("n", self.n, 1)
        self.temperature = check_real("temperature", self.temperature, "a finite number >= 0",
                                      lambda x: x >= 0)
        self.top_p = check_real("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1)
        self.top_k = check_int("top_k", self.top_k, -1)
        self.min_p = check_real("min_p", self.min_p, "in [0, 1]", lambda x: 0 <= x <= 1)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed)
        if self.max_tokens is not None:
            self.max_tokens = check_int("max_tokens", self.max_tokens, 1)
        self.min_tokens = check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        stop = self.stop if self.stop is not None else ()
        check_type("stop", stop, (str, list, tuple), "a str, a list of str or None")
        self.stop_strings = (stop,) if isinstance(stop, str) else tuple(stop)
        for i, s in enumerate(self.stop_strings):
            check_type(f"stop[{i}]", s, str, "a non-empty str")
            if not s:
                raise ValueError("stop strings must be non-empty str, got ''")
        self.stop_token_ids = check_int_list(
            "stop_token_ids", self.stop_token_ids if self.stop_token_ids is not None else [], 0)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            check_bool(name, getattr(self, name))
        self.repetition_penalty = check_real("repetition_penalty", self.repetition_penalty,
                                             "a finite number > 0", lambda x: x > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, check_real(name, getattr(self, name), "in [-2, 2]", lambda x: -2 <= x <= 2))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), 0, MAX_LOGPROBS))
        self.prompt_logprobs_start = check_int("prompt_logprobs_start", self.prompt_logprobs_start, 0)
        if self.prompt_logprobs_start and self.prompt_logprobs is None:
            raise ValueError("prompt_logprobs_start needs prompt_logprobs (an int in [0, 20])")
        check_bool("detokenize", self.detokenize)
        if not self.detokenize and self.stop_strings:
            raise ValueError("stop strings need text: use detokenize=True, or stop_token_ids")
        if self.truncate_prompt_tokens is not None:
            self.truncate_prompt_tokens = check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                raise TypeError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = check_int_list("allowed_token_ids", self.allowed_token_ids, 0)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must hold at least one token id")
        for f in self.logits_processors or ():
            if not callable(f):
                raise TypeError(f"logits_processors entries must be callables, got {f!r}")
            logits_processor_arity(f)
        if not (self.tools is None or self.tools == "auto" or callable(self.tools)):
            raise TypeError(f"tools must be 'auto' (nanochat's calculator), None (no tools) or a "
                            f"callable from the expression text to the text to force (or None), got {self.tools!r}")
        if self.output_kind is not None and not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.structured_outputs is not None:
            self._validate_structured_outputs()

    def _validate_structured_outputs(self):
        check_type("structured_outputs", self.structured_outputs, StructuredOutputsParams,
                   "a StructuredOutputsParams or None")
        # the grammar allows no special token, so nanochat's calculator ("auto") never starts
        if callable(self.tools):
            raise ValueError("tools and structured_outputs exclude each other: a structured output holds "
                             "no special tokens, so no tool call; use tools=None or 'auto'")
        if self.ignore_eos:
            raise ValueError("ignore_eos=True and structured_outputs exclude each other: a structured "
                             "output ends with EOS where its grammar is complete")


def logits_processor_arity(f: Callable) -> int:
    """2 for f(output_token_ids, logits), 3 for f(prompt_token_ids, output_token_ids, logits)."""
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return 2  # a builtin without a signature: assume the common form
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) in (2, 3):
        return len(positional)
    raise TypeError(f"logits processor {f!r} must take (output_token_ids, logits) or "
                    f"(prompt_token_ids, output_token_ids, logits)")


class SamplingParams(_SamplingFields):
    """How one request's tokens are chosen, with vLLM's names and defaults; checked on creation."""

    def __init__(self, *args, **kwargs):
        # names vLLM-only arguments where the generated __init__ would only say
        # "unexpected keyword argument"
        super().__init__(*args, **unsupported.check_arguments(
            "SamplingParams", kwargs, _FIELD_NAMES, unsupported.SAMPLING_ARGS))


_FIELD_NAMES = {f.name for f in fields(_SamplingFields) if f.init}


@dataclass
class BeamSearchParams:
    """How LLM.beam_search explores: the beam_width best continuations of each prompt."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False            # False: a beam that emits EOS is finished
    temperature: float = 0.0            # > 0 adds one sampled token to each beam's candidates
    length_penalty: float = 1.0         # beams rank by cum_logprob / length ** length_penalty

    def __post_init__(self):
        # each beam offers its 2 * beam_width most likely tokens, as top log-probs
        check_int("beam_width", self.beam_width, 1, MAX_LOGPROBS // 2)
        check_int("max_tokens", self.max_tokens, 1)
        check_bool("ignore_eos", self.ignore_eos)
        check_real("temperature", self.temperature, "a finite number >= 0", lambda x: x >= 0)
        check_real("length_penalty", self.length_penalty, "a finite number")
