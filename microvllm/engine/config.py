"""EngineConfig: every engine setting, checked before anything is loaded."""

import os
from dataclasses import dataclass

import torch

from ..model.attention import ATTENTION_BACKENDS
from ..model.quantization import QUANTIZATIONS
from ..platform import pick_device
from ..speculative.config import SpeculativeConfig, parse_speculative_config
from ..validation import check_bool, check_choice, check_int, check_real, check_type

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's other names for them, so that its dtype="half" and dtype="float" carry over
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
# on CPU, by default: room for max_num_seqs full-length sequences, at most this share of
# the RAM available once the weights are loaded (what gpu_memory_utilization is on a GPU)
CPU_KV_CACHE_RAM_FRACTION = 0.5
DEFAULT_MAX_NUM_SEQS = 256


@dataclass
class EngineConfig:
    model: str                              # a dir, a nanochat SOURCE[:TAG] or a hub id (model/sources.py)
    tokenizer: str | None = None
    step: int | None = None                 # checkpoint step; None = the largest
    revision: str | None = None             # of a hub id: a branch, tag or commit; None = main
    device: str | None = None               # None = cuda if available, else cpu
    # None = bfloat16 on CUDA and on CPUs with bfloat16 instructions, float32 on other CPUs;
    # float16 on a CPU runs as bfloat16
    dtype: str | torch.dtype | None = None
    block_size: int | None = None           # None = the attention backend's default
    num_blocks: int | None = None           # None = sized from the memory budget
    kv_cache_memory: int | None = None      # bytes for the KV cache
    gpu_memory_utilization: float = 0.9     # on cuda without kv_cache_memory
    max_num_seqs: int | None = DEFAULT_MAX_NUM_SEQS  # None (vLLM's "the default") = the same
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None        # None = the model's sequence_len
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False             # on cuda: no CUDA graphs for decode steps
    logit_softcap: float | None = None      # override for nanochat's era-C softcap-20 window
    quantization: str | None = None         # "int8" or "fp8" weights, made at load time
    seed: int = 0                           # draws the seeds of requests that set none
    step_timing: bool = False               # EngineStats gains host and device ms per step
    cpu_threads: int | None = None          # on cpu; None = OMP_NUM_THREADS if set, else cpu_threads.py's default
    # vLLM's {"method": "ngram", "num_speculative_tokens": k, ...} or {"model": DIR, ...},
    # stored checked as a SpeculativeConfig (speculative/config.py); None = no speculative decoding
    speculative_config: dict | SpeculativeConfig | None = None

    def __post_init__(self):
        """Checks every setting by type and range, and stores it normalised."""
        self.model = _check_path("model", self.model)
        if self.tokenizer is not None:
            self.tokenizer = _check_path("tokenizer", self.tokenizer)
        if self.step is not None:
            self.step = check_int("step", self.step, 0)
        if self.device is not None:
            check_type("device", self.device, (str, torch.device), "'cpu', 'cuda' or 'cuda:N' (a str)")
        if self.dtype is not None:
            check_type("dtype", self.dtype, (str, torch.dtype), f"one of {_dtype_names()} "
                       "or the matching torch.dtype")
        if self.block_size is not None:
            self.block_size = check_int("block_size", self.block_size, 1)
            if self.block_size & (self.block_size - 1):
                raise ValueError(f"block_size={self.block_size} must be a power of two")
        if self.num_blocks is not None:
            self.num_blocks = check_int("num_blocks (a KV cache of at least one block)", self.num_blocks, 1)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = int(check_real("kv_cache_memory", self.kv_cache_memory,
                                                  "a finite number of bytes >= 1", lambda x: x >= 1))
        self.gpu_memory_utilization = check_real("gpu_memory_utilization", self.gpu_memory_utilization,
                                                 "a number in (0, 1]", lambda x: 0 < x <= 1)
        self.max_num_seqs = (DEFAULT_MAX_NUM_SEQS if self.max_num_seqs is None
                             else check_int("max_num_seqs", self.max_num_seqs, 1))
        self.max_num_batched_tokens = check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_model_len is not None:
            self.max_model_len = check_int("max_model_len", self.max_model_len, 2)
        check_bool("enable_prefix_caching", self.enable_prefix_caching)
        check_type("attention_backend", self.attention_backend, str, f"one of {ATTENTION_BACKENDS}")
        check_bool("enforce_eager", self.enforce_eager)
        if self.logit_softcap is not None:
            self.logit_softcap = check_real("logit_softcap", self.logit_softcap, "a finite number > 0 "
                                            "(nanochat uses 15, or 20 for some era-C checkpoints)",
                                            lambda x: x > 0)
        self.seed = check_int("seed", self.seed)
        if self.cpu_threads is not None:
            self.cpu_threads = check_int("cpu_threads", self.cpu_threads, 1)
        check_choice("quantization", self.quantization, QUANTIZATIONS + (None,))
        self.speculative_config = parse_speculative_config(self.speculative_config)

    def resolve_device(self) -> torch.device:
        return pick_device(self.device)

    def resolve_dtype(self, default: torch.dtype) -> torch.dtype:
        """The dtype asked for; `default` (the platform's) for None or "auto". The platform
        may run another (Platform.runnable_dtype: float16 on a CPU runs as bfloat16)."""
        if self.dtype is None or (isinstance(self.dtype, str) and self.dtype.lower() == "auto"):
            return default
        if isinstance(self.dtype, torch.dtype) and self.dtype in DTYPES.values():
            return self.dtype
        name = self.dtype.lower() if isinstance(self.dtype, str) else self.dtype  # as vLLM: any case
        if name in DTYPES or name in DTYPE_ALIASES:
            return DTYPES[DTYPE_ALIASES.get(name, name)]
        raise ValueError(f"unknown dtype {self.dtype!r}; use one of {_dtype_names()}")


@dataclass(frozen=True)
class ServedModelConfig:
    """vLLM's `llm.llm_engine.model_config`, with the fields microvllm has: the model
    as the engine runs it, defaults resolved."""
    model: str
    max_model_len: int  # prompt and output together


def _dtype_names() -> str:
    return ", ".join(repr(n) for n in ["auto", *sorted(DTYPES), *DTYPE_ALIASES])


def _check_path(name: str, value) -> str:
    return os.fspath(check_type(name, value, (str, os.PathLike), "a directory path (a str or Path)"))
