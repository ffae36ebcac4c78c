"""SamplingParams: how the tokens of one request are chosen, validated on creation."""

from dataclasses import dataclass, field

from .validation import check_bool, check_int, check_int_list, check_real, check_type

MAX_LOGPROBS = 20
# below this, logits / temperature overflows float32 and softmax gives NaN; such a
# temperature means "the most likely token" anyway, so it samples greedily
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
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
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        self._validate()

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
