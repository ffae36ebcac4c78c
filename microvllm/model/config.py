"""Model configuration: nanochat's `model_config` plus the architecture era.

nanochat's GPT changed its forward math several times without recording a version in
its checkpoints. Each era below is the set of constants one range of nanochat commits
used; `loader.detect_era` tells them apart from the state-dict keys and shapes.
"""

from dataclasses import dataclass, field

from ..arithmetic import cdiv
from ..validation import check_int, check_real, check_type


@dataclass(frozen=True)
class Era:
    name: str
    rotary_base: float
    qk_scale: float              # q and k are multiplied by this after QK-norm
    has_lambdas: bool            # per-layer resid_lambdas / x0_lambdas
    ve_gate_channels: int        # 0 = no value embeddings
    ve_gate_scale: float         # gate = scale * sigmoid(ve_gate(x[..., :channels]))
    has_smear_backout: bool
    short_window_divisor: int    # 0 = no sliding windows at all
    round_short_window: bool     # short window rounded up to a multiple of 128, else floored


ERAS = {
    "A": Era("A", 10000.0, 1.0, False, 0, 0.0, False, 0, False),
    "B": Era("B", 10000.0, 1.0, True, 0, 0.0, False, 2, False),
    "C": Era("C", 10000.0, 1.0, True, 32, 2.0, False, 2, False),
    "D": Era("D", 100000.0, 1.15, True, 12, 3.0, False, 3, True),
    "E": Era("E", 100000.0, 1.2, True, 12, 3.0, True, 4, True),
}


@dataclass(frozen=True)
class ModelConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "L"
    era: str = "E"
    padded_vocab_size: int = 0   # 0 = vocab_size rounded up to a multiple of 64
    logit_softcap: float = 15.0
    spec: Era = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.era not in ERAS:
            raise ValueError(f"unknown nanochat era {self.era!r}; known eras: {sorted(ERAS)}")
        object.__setattr__(self, "spec", ERAS[self.era])
        # a prompt needs a token and room for one more: sequence_len 1 serves nothing
        check_int("model_config.sequence_len", self.sequence_len, 2)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            check_int(f"model_config.{name}", getattr(self, name), 1)
        check_int("padded_vocab_size", self.padded_vocab_size, 0)
        if self.padded_vocab_size == 0:
            object.__setattr__(self, "padded_vocab_size", cdiv(self.vocab_size, 64) * 64)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd={self.n_embd} must divide by n_head={self.n_head}, "
                             f"and n_head by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:  # rotary embeddings turn pairs of channels
            raise ValueError(f"head dim n_embd / n_head = {self.head_dim} must be even")
        check_type("model_config.window_pattern", self.window_pattern, str, "a str of 'S' and 'L'")
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} must be made of 'S' and 'L'")
        check_real("logit_softcap", self.logit_softcap, "a finite number > 0", lambda x: x > 0)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def has_value_embeds(self, layer_idx: int) -> bool:
        # nanochat alternates value embeddings so that the last layer always has one
        return self.spec.ve_gate_channels > 0 and layer_idx % 2 == (self.n_layer - 1) % 2

    @property
    def window_sizes(self) -> list[int | None]:
        """Per-layer attention window: query i sees keys i-w..i; None = unlimited."""
        spec, long_window = self.spec, self.sequence_len
        if spec.short_window_divisor == 0:
            return [None] * self.n_layer
        if spec.round_short_window:  # ceil(ceil(S / divisor) / 128) * 128, as nanochat
            short_window = cdiv(cdiv(long_window, spec.short_window_divisor), 128) * 128
        else:
            short_window = long_window // spec.short_window_divisor
        pattern = self.window_pattern.upper()
        windows = [short_window if pattern[i % len(pattern)] == "S" else long_window
                   for i in range(self.n_layer)]
        windows[-1] = long_window  # nanochat always gives the last layer the full context
        return windows
