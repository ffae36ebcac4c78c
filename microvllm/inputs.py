"""The prompt types where vLLM code imports them (`vllm.inputs`)."""

from .prompts import TextPrompt, TokensPrompt

__all__ = ["TextPrompt", "TokensPrompt"]
