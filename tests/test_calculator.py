"""The calculator tool gives what nanochat's calculator gives, safely and on any thread.

The expected texts are what nanochat's `use_calculator` returns, passed through `str`.
With $NANOCHAT_SRC naming a nanochat checkout whose engine imports, the same table and
random expressions are also checked against nanochat itself.
"""

import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from microvllm.tools import calculator
from microvllm.tools.calculator import MAX_LENGTH, evaluate

HUGE_FLOAT = "9" * 400 + ".0"  # a literal past the float range, which Python reads as inf

# (expression, the text nanochat forces, or None when it forces nothing)
CASES = [
    ("1,234 + 5", "1239"),
    ("2*3+4", "10"),
    ("(1+2)*3", "9"),
    ("10/4", "2.5"),
    ("10/2", "5.0"),
    ("7//2", "3"),
    ("-7//2", "-4"),
    ("7.5//2", "3.0"),
    ("0.1+0.2", "0.30000000000000004"),
    ("-(-3)", "3"),
    ("+5", "5"),
    ("1.", "1.0"),
    (".5*2", "1.0"),
    ("00.5", "0.5"),
    ("000", "0"),
    ("   1 + 2", "3"),
    ("1 000 000", None),
    ("007", None),
    ("2**10", None),
    ("2 ** 10", None),
    ("2* *10", None),
    ("5%2", None),
    ("1/0", None),
    ("1//0", None),
    ("1/0.0", None),
    ("1+", None),
    ("", None),
    (",", None),
    ("   ", None),
    ("1+\n2", None),
    ("(2)(3)", None),
    ("()", "()"),
    ("()*3", "()"),
    ("()+()", "()"),
    ("-()", None),
    ("()*1.5", None),
    ("()*99999999999999999999", None),
    ("...", "Ellipsis"),
    ("...+1", None),
    (HUGE_FLOAT, "inf"),
    (HUGE_FLOAT + "-" + HUGE_FLOAT, "nan"),
    ("9" * 400 + "/1", None),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("an")', "2"),
    ("( 'a b a' ).count( 'a' )", "2"),
    ("'Mississippi'.count('')", "12"),
    ("'1,2,2'.count('2')", "2"),
    ("'strawberry'.count('R')", "0"),
    ("'abc'.count()", None),
    ("'abc'.count(1)", None),
    ("'abc'.count('a' 'b')", "1"),
    ("'directory'.count('r')", None),
    ("'FILE'.count('L')", None),
    ("'éa'.count('a')", None),
    ("'a-b'.count('-')", None),
    ("'a'.count('a')+1", None),
    ("x.count('a')", None),
    ("[1].count(1)", None),
    ("'abc'.upper()", None),
    ("abc", None),
    ("__import__('os')", None),
    ("().__class__", None),
    ("(1).real", None),
    ("lambda: 1", None),
    ("[c for c in 'abc']", None),
    ("'abc'[0]", None),
]

# text nanochat evaluates but this calculator refuses: see the module's docstring
DEVIATIONS = [
    ("'abc'.count('a').real", "1"),
    ("'Abc'.lower().count('a')", "1"),
    ("'.count('", ".count("),
    ("'a'.count('a') if 1 else 0", "1"),
]


def _ids(cases: list[tuple[str, str | None]]) -> list[str]:
    return [repr(expression[:30]) for expression, _ in cases]


@pytest.mark.parametrize("expression, expected", CASES, ids=_ids(CASES))
def test_gives_the_text_nanochat_gives(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, nanochat_gives", DEVIATIONS, ids=_ids(DEVIATIONS))
def test_counting_accepts_only_a_literal_counted_in_a_literal(expression, nanochat_gives):
    assert calculator(expression) is None


def test_division_gives_a_float_and_the_rest_of_int_arithmetic_an_int():
    assert type(evaluate("10/2")) is float
    assert type(evaluate("10//2")) is int
    assert type(evaluate("2*3-1")) is int


def test_long_multiplication_chain_is_exact_and_fast():
    expression = "*".join(["9999999"] * 200)
    start = time.monotonic()
    assert calculator(expression) == str(9999999 ** 200)
    assert time.monotonic() - start < 1


def test_expression_at_the_length_limit_is_evaluated():
    expression = "1+" * (MAX_LENGTH // 2 - 1) + "1"
    assert len(expression) <= MAX_LENGTH
    assert calculator(expression) == str(MAX_LENGTH // 2)


def test_expression_over_the_length_limit_gives_none_quickly():
    start = time.monotonic()
    assert calculator("1+" * 1_000_000 + "1") is None
    assert calculator("1" * (MAX_LENGTH + 1)) is None
    assert time.monotonic() - start < 1


def test_unary_chain_at_the_length_limit_is_evaluated_without_recursion():
    assert calculator("-" * (MAX_LENGTH - 1) + "1") == "-1"


def test_parentheses_nested_as_deep_as_python_allows_are_evaluated():
    assert calculator("(" * 200 + "1" + ")" * 200) == "1"


def test_parentheses_nested_deeper_than_python_allows_give_none():
    assert calculator("(" * 201 + "1" + ")" * 201) is None


def test_parentheses_nested_10000_deep_give_none_quickly():
    start = time.monotonic()
    assert calculator("(" * 10_000 + "1" + ")" * 10_000) is None
    assert time.monotonic() - start < 1


def test_works_off_the_main_thread():
    expressions = [expression for expression, _ in CASES] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(calculator, expressions))
    assert results == [expected for _, expected in CASES] * 4


# ---------------------------------------------------------------- against nanochat itself

def _random_number(rng: random.Random) -> str:
    digits = str(rng.choice([0, 1, 2, 7, 10, 12, 99, 1234, 9999999, 10 ** 30 + 7]))
    if rng.random() < 0.2 and len(digits) > 3:
        digits = f"{int(digits):,}"  # thousands separators, which nanochat drops
    return rng.choice([digits, digits, digits + ".5", "." + digits[-1], digits + "."])


def _random_arithmetic(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.3:
        return _random_number(rng)
    shape = rng.random()
    if shape < 0.15:
        return rng.choice("+-") + _random_arithmetic(rng, depth + 1)
    if shape < 0.3:
        return "(" + _random_arithmetic(rng, depth + 1) + ")"
    op = rng.choice(["+", "-", "*", "/", "//", " * ", " / "])
    return _random_arithmetic(rng, depth + 1) + op + _random_arithmetic(rng, depth + 1)


def _random_scribble(rng: random.Random) -> str:
    """Characters the arithmetic branch lets through, mostly not Python at all."""
    return "".join(rng.choice("0123456789*+-/.() ,") for _ in range(rng.randint(1, 12)))


def _random_count(rng: random.Random) -> str:
    word = rng.choice(["strawberry", "banana", "Mississippi", "a b c", "", "raspberry"])
    letter = rng.choice(["r", "a", "ss", "", " ", "B"])
    quote = rng.choice(["'", '"'])
    return f"{quote}{word}{quote}.count({quote}{letter}{quote})"


def _random_expressions(count: int) -> list[str]:
    rng = random.Random(0)
    makers = [_random_arithmetic, _random_scribble, _random_count]
    return [makers[i % len(makers)](rng) for i in range(count)]


@pytest.fixture(scope="module")
def nanochat_calculator():
    source = os.environ.get("NANOCHAT_SRC")
    if not source:
        pytest.skip("set NANOCHAT_SRC to a nanochat checkout to compare against it")
    sys.path.insert(0, source)
    try:
        from nanochat.engine import use_calculator
    except Exception as error:  # its engine needs torch and its own dependencies
        pytest.skip(f"nanochat's engine does not import: {error!r}")
    finally:
        sys.path.remove(source)
    return use_calculator


def _same(ours, theirs) -> bool:
    return type(ours) is type(theirs) and str(ours) == str(theirs)  # str: nan != nan


@pytest.mark.parametrize("expression", [expression for expression, _ in CASES],
                         ids=_ids(CASES))
def test_agrees_with_nanochat_on_the_table(nanochat_calculator, expression):
    assert _same(evaluate(expression), nanochat_calculator(expression))


def test_agrees_with_nanochat_on_random_expressions(nanochat_calculator):
    disagreements = [(expression, evaluate(expression), nanochat_calculator(expression))
                     for expression in _random_expressions(3000)]
    assert [case for case in disagreements if not _same(case[1], case[2])] == []


@pytest.mark.parametrize("expression, nanochat_gives", DEVIATIONS, ids=_ids(DEVIATIONS))
def test_nanochat_evaluates_the_refused_counting_forms(nanochat_calculator, expression,
                                                       nanochat_gives):
    assert str(nanochat_calculator(expression)) == nanochat_gives
