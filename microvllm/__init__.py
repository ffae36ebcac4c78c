"""microvllm: fast, readable offline batched inference for nanochat GPT models."""

from .llm import LLM
from .outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .prompts import TextPrompt, TokensPrompt
from .sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from .structured import StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics",
           "RequestOutputKind", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "StructuredOutputsParams",
           "TextPrompt", "TokensPrompt"]
__version__ = "0.1.0"
