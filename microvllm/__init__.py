"""microvllm: fast, readable offline batched inference for nanochat GPT models."""

from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics", "RequestOutputKind"]
__version__ = "0.1.0"
