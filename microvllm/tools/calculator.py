"""The calculator nanochat's models were trained to call, evaluated without eval().

A nanochat model asks for a calculation by writing `<|python_start|>expr<|python_end|>`.
nanochat decodes `expr`, evaluates it, and when the evaluation gives a value it forces
`<|output_start|>`, the tokens of `str(value)`, and `<|output_end|>`; when it gives
nothing, no tokens are forced and the model simply goes on. The rules nanochat applies,
which `evaluate` reproduces:

- Every comma is deleted first, so "1,234" is 1234 (and no tuple or second argument
  can ever be written).
- Arithmetic: when every character is a digit, a space or one of `+ - * / . ( )`, the
  text is evaluated as a Python expression, except that any `**` refuses it. Python's
  meanings hold: `/` always gives a float (`10/2` is 5.0), `//` floor-divides, a float
  past the float range is `inf`, dividing by zero gives nothing. Even the odd values
  this character set can spell are kept: `()` is the empty tuple and `...` is Ellipsis.
- Letter counting: otherwise the text may hold only ASCII letters, digits, spaces,
  quotes and `( ) . _`; it must contain `.count(`, and it must not contain (in any
  letter case) `__` or the words import, exec, eval, compile, open, file, input, globals,
  locals, vars, dir, getattr, setattr, delattr or hasattr, so even
  `'directory'.count('r')` is refused. Such text is then evaluated as Python.
- Anything else, and any evaluation that fails, gives nothing.

nanochat runs Python's eval with empty builtins under a SIGALRM timer. Here the text is
parsed with `ast` and only a whitelist of nodes is evaluated, because eval on model
output is unsafe and SIGALRM works only on the main thread (nanochat's calculator gives
nothing at all when called from any other thread, e.g. inside a Ray actor). Instead of a
timer, the work is bounded by the length of the text: text over `MAX_LENGTH` characters
gives nothing, the walk visits each node once, and an integer result has no more digits
than the text has characters (a product's digits are at most the sum of its factors'),
so every operation is on numbers of at most `MAX_LENGTH` digits and `str` never meets
Python's 4300-digit limit. The walk keeps its own stack, so deep nesting cannot
overflow Python's; the parser refuses parentheses nested over 200 deep, as eval does.

Where this differs from nanochat, on purpose:
- Text over `MAX_LENGTH` characters gives nothing (nanochat evaluates it).
- The letter-counting branch accepts only `'string literal'.count('string literal')`
  (any quotes, parentheses and spaces around the parts). nanochat would also evaluate
  other Python that passes its filters, e.g. `'Abc'.lower().count('a')`,
  `'abc'.count('a').real` or a bare string literal containing ".count("; here those
  give nothing.
- It works on every thread.
"""

import ast
import operator
import string
import warnings
from collections.abc import Callable
from types import EllipsisType

# longer than any calculation a model writes; keeps the cost bounded (see above) and the
# nesting well below the depth at which Python's eval gives up (about 3,000 operators)
MAX_LENGTH = 2000

Value = int | float | tuple[()] | EllipsisType

_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_COUNTING_CHARS = frozenset(string.ascii_letters + string.digits + "'\"()._ ")
_FORBIDDEN_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input",
                    "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr",
                    "hasattr")

_BINARY: dict[type[ast.operator], Callable[[Value, Value], Value]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY: dict[type[ast.unaryop], Callable[[Value], Value]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}

_SOURCE_NAME = "<calculator>"
# text like "1else" makes newer parsers warn (3.12 with a DeprecationWarning); the refusal
# is the answer, not a warning on stderr. A filter on our source name is thread-safe,
# unlike catch_warnings
for _category in (SyntaxWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=_SOURCE_NAME)


class _Refused(Exception):
    """The text holds something outside the whitelist."""


def calculator(expression: str) -> str | None:
    """The text nanochat forces as the tool's output for `expression`, or None for none."""
    value = evaluate(expression)
    return None if value is None else str(value)


def evaluate(expression: str) -> Value | None:
    """The value nanochat's calculator gives for `expression`, or None for none."""
    if len(expression) > MAX_LENGTH:
        return None
    text = expression.replace(",", "")
    if set(text) <= _ARITHMETIC_CHARS:
        if "**" in text:
            return None
        return _evaluate_with(text, _arithmetic)
    if not set(text) <= _COUNTING_CHARS:
        return None
    lowered = text.lower()
    if ".count(" not in text or any(word in lowered for word in _FORBIDDEN_WORDS):
        return None
    return _evaluate_with(text, _count)


def _evaluate_with(text: str, walk: Callable[[ast.expr], Value]) -> Value | None:
    try:
        # eval skips leading spaces, a parse would call them an indent
        tree = ast.parse(text.lstrip(" "), _SOURCE_NAME, mode="eval")
        return walk(tree.body)
    except (_Refused, SyntaxError, RecursionError, MemoryError, ArithmeticError, TypeError):
        # ArithmeticError and TypeError are Python's own: 1/0, ()*1.5, -(), ...*2
        return None


def _arithmetic(root: ast.expr) -> Value:
    """Evaluates numbers, `()`, `...`, unary +/- and + - * / // in Python's order."""
    values: list[Value] = []
    pending: list[tuple[ast.expr, bool]] = [(root, False)]  # (node, operands done)
    while pending:
        node, operands_done = pending.pop()
        if operands_done:
            if isinstance(node, ast.BinOp):
                right = values.pop()
                values.append(_BINARY[type(node.op)](values.pop(), right))
            else:
                values.append(_UNARY[type(node.op)](values.pop()))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            # popped last to first: the left operand is evaluated first, as in Python
            pending += [(node, True), (node.right, False), (node.left, False)]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            pending += [(node, True), (node.operand, False)]
        elif isinstance(node, ast.Constant) and (
                type(node.value) in (int, float) or node.value is Ellipsis):
            values.append(node.value)
        elif isinstance(node, ast.Tuple) and not node.elts:
            values.append(())
        else:
            # anything else this character set spells is a call (nothing here is
            # callable) or a starred operand, which Python's eval refuses too
            raise _Refused
    return values.pop()


def _count(root: ast.expr) -> int:
    """Evaluates `'text'.count('part')`, both parts string literals."""
    match root:
        case ast.Call(func=ast.Attribute(value=ast.Constant(value=str(text)), attr="count"),
                      args=[ast.Constant(value=str(part))], keywords=[]):
            return text.count(part)
    raise _Refused
