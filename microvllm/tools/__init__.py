"""Tools a nanochat model calls from inside its own output.

The model writes `<|python_start|>expr<|python_end|>`; the engine answers by forcing
`<|output_start|>` + the tool's text + `<|output_end|>` before the model goes on
(tool_calls.py). The default tool is nanochat's calculator (calculator.py).
"""

from .calculator import calculator
from .tool_calls import Tool, ToolCalls

__all__ = ["calculator", "Tool", "ToolCalls"]
