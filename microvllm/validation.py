"""Checks for public arguments, shared by every entry point.

Each check names the argument and what it allows. A value of the wrong type raises
TypeError, a value of the right type out of range raises ValueError; both are raised
before anything is queued or loaded, so a bad argument never leaves the engine half
changed. bool is refused where a number is asked for: `True` is an int to Python but
never what a user meant by `max_tokens=True`. numpy's integers and floats are accepted
and returned as plain Python numbers.
"""

import argparse
import json
import math
import numbers


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{_range(minimum, maximum)}, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int{_range(minimum, maximum)}, got {value}")
    return value


def check_real(name: str, value, allowed: str, ok=lambda x: True) -> float:
    """A finite int or float for which `ok` holds; `allowed` says which in words."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    # "no" and 0 would both pass an `if value:` test the wrong way round
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> object:
    if value not in choices:
        error = ValueError if any(type(value) is type(c) for c in choices) else TypeError
        raise error(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_type(name: str, value, types, allowed: str):
    """`value` is an instance of `types`; `allowed` names them in words."""
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {_short(value)}")
    return value


def check_int_list(name: str, value, minimum: int | None = None) -> list[int]:
    """A list or tuple of ints (a lone int is refused: it is not a list of one)."""
    check_type(name, value, (list, tuple), f"a list of ints{_range(minimum, None)}")
    return [check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value)]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def json_object_argument(text: str) -> dict:
    """A command-line flag's JSON object (argparse reports the error as the flag's)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"method\": \"ngram\", ...}}', got {text!r}")
    return value
