"""EngineConfig: every engine setting, checked before anything is loaded."""

from dataclasses import dataclass

import torch

from ..model.quantization import QUANTIZATIONS
from ..validation import check_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# on CPU, by default: room for max_num_seqs full-length sequences, at most this much
MAX_DEFAULT_CPU_KV_CACHE_MEMORY = 1024**3


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    step: int | None = None                 # checkpoint step; None = the largest
    device: str | None = None               # None = cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # None = bfloat16 on cuda, float32 on cpu
    block_size: int | None = None           # None = the attention backend's default
    num_blocks: int | None = None           # None = sized from the memory budget
    kv_cache_memory: int | None = None      # bytes for the KV cache
    gpu_memory_utilization: float = 0.9     # on cuda without kv_cache_memory
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None        # None = the model's sequence_len
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False             # on cuda: no CUDA graphs for decode steps
    logit_softcap: float | None = None      # override for nanochat's era-C softcap-20 window
    quantization: str | None = None         # "int8" or "fp8" weights, made at load time
    seed: int = 0                           # draws the seeds of requests that set none

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if name == "block_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be an int >= 1 (a KV cache of at least one block), "
                             f"got {self.num_blocks!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        check_choice("quantization", self.quantization, QUANTIZATIONS + (None,))
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2, got {self.max_model_len!r}")

    def resolve_device(self) -> torch.device:
        name = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {name!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use 'cpu'")
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is None or self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(self.dtype, torch.dtype) and self.dtype in DTYPES.values():
            return self.dtype
        if self.dtype in DTYPES:
            return DTYPES[self.dtype]
        raise ValueError(f"unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
