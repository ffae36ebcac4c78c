"""SamplingParams and BeamSearchParams: how tokens are chosen, validated on creation."""

from dataclasses import dataclass, field

from .validation import check_bool, check_int, check_real

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1                          # independent samples of the same prompt
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 or 0 = all tokens
    min_p: float = 0.0
    seed: int | None = None             # same seed, same tokens, whatever runs beside it
    max_tokens: int | None = 16         # None = until max_model_len
    min_tokens: int = 0                 # EOS and stop_token_ids are blocked before this
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0     # > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0       # > 0 discourages tokens already generated
    frequency_penalty: float = 0.0      # ... in proportion to how often
    logprobs: int | None = None         # top log-probs returned per generated token
    prompt_logprobs: int | None = None  # top log-probs returned per prompt token
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        self.stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or ())
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def _validate(self):
        check_int("n", self.n, 1)
        check_real("temperature", self.temperature, "a finite number >= 0", lambda x: x >= 0)
        check_real("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1)
        check_int("top_k", self.top_k, -1)
        check_real("min_p", self.min_p, "in [0, 1]", lambda x: 0 <= x <= 1)
        if self.seed is not None:
            check_int("seed", self.seed)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 1)
        check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            check_int("stop_token_ids entries", t, 0)
        check_real("repetition_penalty", self.repetition_penalty, "a finite number > 0", lambda x: x > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            check_real(name, getattr(self, name), "in [-2, 2]", lambda x: -2 <= x <= 2)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 0, MAX_LOGPROBS)


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
