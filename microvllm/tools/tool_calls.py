"""ToolCalls: nanochat's tool-call protocol, which the engine's ToolUse feature applies.

A call is the output tokens between `<|python_start|>` and the `<|python_end|>` just
sampled; its expression is their text. When the tool answers with text, the engine
forces `<|output_start|>`, the tokens of that text and `<|output_end|>` into the
sequence, and computes them together in the next step. The state (is a call open?) is
read back from the sequence's own tokens when `<|python_end|>` is sampled, so it needs
no bookkeeping per token and survives preemption, which recomputes the same tokens.
"""

from dataclasses import dataclass
from typing import Callable

from ..tokenizer import Tokenizer
from .calculator import calculator

Tool = Callable[[str], "str | None"]   # expression text -> the text to force, or None


@dataclass(frozen=True)
class ToolCalls:
    python_start: int
    python_end: int
    output_start: int
    output_end: int
    tool: Tool

    @classmethod
    def for_request(cls, tools: "str | Tool | None", tokenizer: Tokenizer) -> "ToolCalls | None":
        """What SamplingParams.tools asks for: "auto" is nanochat's calculator, None no tools,
        a callable the caller's own tool."""
        if tools is None:
            return None
        special = tokenizer.special
        return cls(special["<|python_start|>"], special["<|python_end|>"], special["<|output_start|>"],
                   special["<|output_end|>"], calculator if tools == "auto" else tools)

    def forced_tokens(self, output_token_ids: list[int], tokenizer: Tokenizer) -> list[int]:
        """The tokens to force after `output_token_ids`, which end in `<|python_end|>`:
        the tool's answer to the open call, or none (no call open, an empty one, no answer)."""
        start = None
        for i in range(len(output_token_ids) - 2, -1, -1):
            token = output_token_ids[i]
            if token == self.python_start:
                start = i
                break
            if token == self.python_end:
                return []  # the call was closed already
        if start is None or start == len(output_token_ids) - 2:
            return []
        answer = self.tool(tokenizer.decode(output_token_ids[start + 1:-1], skip_special_tokens=False))
        if answer is None:
            return []
        return [self.output_start, *tokenizer.encode(str(answer), prepend_bos=False), self.output_end]
