"""Grammars: constraints parsed, then compiled against the tokenizer, once per distinct constraint.

Parsing needs no tokenizer, so the facade checks every request's constraint with it
before queuing any (`check`). Compiling builds, for the tokenizer's vocabulary, what a
matcher needs to tell the allowed tokens quickly; the engine compiles when a request
is added, so the step loop never waits on it, and 1,000 requests with one schema
compile once. Each sequence gets its own matcher (`new_matcher`): its position in the grammar.

The vocabulary is our tiktoken ranks' bytes. Special tokens are given as empty, which
xgrammar never allows; EOS is its stop token, allowed once the grammar is complete.
"""

import functools
import re

from ..extras import import_xgrammar
from ..tokenizer import Tokenizer
from .params import StructuredOutputsParams

# distinct constraints kept parsed, and compiled, before the least recently used is dropped
GRAMMARS_KEPT = 256
# "[11:56:03] /project/cpp/json_schema_converter.cc:5082: ", before each xgrammar error
XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@functools.lru_cache(maxsize=GRAMMARS_KEPT)
def parsed(key: tuple[str, str]):
    """The xgrammar Grammar of a StructuredOutputsParams.key; ValueError names a bad one."""
    xgr = import_xgrammar()
    kind, source = key
    try:
        if kind in ("json", "json_object"):
            # compact JSON (json.dumps' separators): free whitespace lets a model wander in it
            return xgr.Grammar.from_json_schema(source, any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(source)
        return xgr.Grammar.from_ebnf(source)  # grammar, and choice's alternatives
    except RuntimeError as e:
        raise InvalidConstraint(kind, str(e)) from None


class InvalidConstraint(ValueError):
    """A constraint xgrammar cannot parse; `reason` is xgrammar's own words, without the
    time and C++ source line it puts in front of them."""

    def __init__(self, kind: str, xgrammar_error: str):
        self.reason = XGRAMMAR_PREFIX.sub("", xgrammar_error.strip().splitlines()[-1])
        super().__init__(f"structured_outputs.{kind} is not valid: {self.reason}")


def check(constraint: StructuredOutputsParams) -> None:
    """Raise what compiling the constraint would (a ValueError, or an ImportError without xgrammar)."""
    parsed(constraint.key)


class Grammars:
    """The engine's compiled grammars: `compiled(constraint.key)`, cached by key."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._compiler = None  # built at the first constrained request: unconstrained runs never import xgrammar
        self.compiled = functools.lru_cache(maxsize=GRAMMARS_KEPT)(self._compile)

    def _compile(self, key: tuple[str, str]):
        if self._compiler is None:
            xgr = import_xgrammar()
            tok = self.tokenizer
            vocab = [b"" if t in tok.special_ids else tok.encoding.decode_single_token_bytes(t)
                     for t in range(tok.vocab_size)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                     stop_token_ids=sorted(tok.eos_token_ids))
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # cached here, by key
        return self._compiler.compile_grammar(parsed(key))


def new_matcher(compiled_grammar):
    """A new xgrammar GrammarMatcher at the start of a compiled grammar."""
    # -1: it rolls back any number of tokens (speculative decoding rolls back over a step's guesses)
    return import_xgrammar().GrammarMatcher(compiled_grammar, max_rollback_tokens=-1)
