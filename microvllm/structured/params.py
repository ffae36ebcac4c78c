"""StructuredOutputsParams: the one constraint a request's output must satisfy, as vLLM names it.

Plain data, so SamplingParams stays picklable for Ray replicas: each constraint is
reduced here to a `key`, the (kind, source text) pair that grammars.py parses and
compiles, and that its caches are keyed by.
"""

from dataclasses import dataclass, field
from json import dumps

from ..validation import check_type

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: dict | str | type | None = None   # a JSON schema: a dict, its JSON text, or a pydantic model class
    regex: str | None = None                 # the whole output matches it
    choice: list[str] | None = None          # the output is exactly one of these
    grammar: str | None = None               # EBNF (GBNF's syntax), as xgrammar reads it
    json_object: bool | None = None          # True: any JSON object
    key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams takes exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(given) if given else 'none'}")
        kind = given[0]
        if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):
            self.json = self.json.model_json_schema()  # a class would not pickle by value
        allowed = dict(json=((dict, str), "a JSON schema (a dict or its JSON text) or a pydantic model class"),
                       regex=(str, "a str"), grammar=(str, "an EBNF grammar as a str"),
                       choice=((list, tuple), "a list of str"), json_object=(bool, "True or None"))
        check_type(f"structured_outputs.{kind}", getattr(self, kind), *allowed[kind])
        self.key = (kind, self._source(kind))

    def _source(self, kind: str) -> str:
        """The text grammars.py parses for this kind of constraint."""
        if kind == "json":
            try:  # not sorted: properties are generated in the schema's order
                return self.json if isinstance(self.json, str) else dumps(self.json)
            except (TypeError, ValueError) as e:
                raise TypeError(f"structured_outputs.json must be a JSON schema: {e}") from None
        if kind == "json_object":
            return dumps({"type": "object"})
        if kind == "choice":
            if not self.choice:
                raise ValueError("structured_outputs.choice must hold at least one str")
            for i, c in enumerate(self.choice):
                check_type(f"structured_outputs.choice[{i}]", c, str, "a str")
            # one grammar of literal alternatives; JSON's string escapes are EBNF's too
            return "root ::= " + " | ".join(dumps(c, ensure_ascii=False) for c in self.choice)
        return getattr(self, kind)
