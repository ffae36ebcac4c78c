"""Tools a nanochat model calls from inside its own output.

The model writes `<|python_start|>expr<|python_end|>`; the engine answers by forcing
`<|output_start|>` + the tool's text + `<|output_end|>` before the model goes on.
"""

from microvllm.tools.calculator import calculator

__all__ = ["calculator"]
