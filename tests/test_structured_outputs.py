"""Structured outputs: every finished output satisfies its constraint, whatever runs beside it."""

import ast
import json
import pickle
import re
import sys
from pathlib import Path

import pytest

from microvllm import LLM, BeamSearchParams, RequestOutputKind, SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shakespeare-d4"

# nested objects, enums, arrays and bounded numbers, each bounded so that a random model
# finishes; strings are bounded by a pattern, as a maxLength lets xgrammar emit raw
# control characters (docs/structured-outputs.md)
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "owner": {"type": "object",
                  "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,6}$"},
                                 "verified": {"type": "boolean"}},
                  "required": ["name", "verified"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["id", "kind", "score", "owner", "tags"],
    "additionalProperties": False,
}
EMAIL = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
ARITHMETIC = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]?
"""


@pytest.fixture(scope="module")
def random_llm(tmp_path_factory):
    from checkpoints import write_checkpoint
    return LLM(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "d4", seq_len=256), max_num_seqs=200)


@pytest.fixture(scope="module")
def bundled_llm():
    return LLM(str(BUNDLED_MODEL), max_num_seqs=200, num_blocks=1024)


def structured(constraint, **kwargs) -> SamplingParams:
    kwargs = dict(temperature=1.0, max_tokens=200) | kwargs
    return SamplingParams(structured_outputs=constraint, **kwargs)


def finished_texts(outputs, at_least=0.9) -> list[str]:
    """The texts of completions that ended where their grammar did; most must have."""
    completions = [c for o in outputs for c in o.outputs]
    texts = [c.text for c in completions if c.finish_reason == "stop"]
    assert len(texts) >= at_least * len(completions), [c.finish_reason for c in completions]
    return texts


@pytest.mark.parametrize("llm_name", ["random_llm", "bundled_llm"])
def test_200_json_schema_outputs_validate(request, llm_name):
    llm, count = request.getfixturevalue(llm_name), 200
    params = [structured(StructuredOutputsParams(json=RECORD_SCHEMA), seed=i) for i in range(count)]
    outputs = llm.generate([f"record {i}:" for i in range(count)], params, use_tqdm=False)
    for text in finished_texts(outputs):
        jsonschema.validate(json.loads(text), RECORD_SCHEMA)


def test_regex_outputs_fullmatch(random_llm):
    outputs = random_llm.generate(["email:"] * 32, structured(StructuredOutputsParams(regex=EMAIL), n=2),
                                  use_tqdm=False)
    for text in finished_texts(outputs, at_least=1.0):
        assert re.fullmatch(EMAIL, text), text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_outputs_are_one_of_the_choices(bundled_llm, temperature):
    choices = ["positive", "negative", 'he said "maybe"\n', "naïve"]
    outputs = bundled_llm.generate(["The play was"] * 16, structured(
        StructuredOutputsParams(choice=choices), temperature=temperature), use_tqdm=False)
    assert set(finished_texts(outputs, at_least=1.0)) <= set(choices)


def test_grammar_outputs_parse(random_llm):
    outputs = random_llm.generate(["sum:"] * 32, structured(StructuredOutputsParams(grammar=ARITHMETIC)),
                                  use_tqdm=False)
    for text in finished_texts(outputs):
        assert isinstance(eval(compile(ast.parse(text, mode="eval"), "<output>", "eval")), int)


def test_json_object_outputs_are_objects(random_llm):
    outputs = random_llm.generate(["obj:"] * 16, structured(StructuredOutputsParams(json_object=True),
                                                            max_tokens=250), use_tqdm=False)
    for o in outputs:  # unbounded: most run out of tokens, so only the finished are parsed
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(o.outputs[0].text), dict)


def test_pydantic_model_class_is_its_schema_and_params_pickle(random_llm):
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(pattern="^[a-z]{1,5}$")
        legs: int = pydantic.Field(ge=0, le=8)

    params = pickle.loads(pickle.dumps(structured(StructuredOutputsParams(json=Pet))))
    assert params.structured_outputs.json == Pet.model_json_schema()
    for text in finished_texts(random_llm.generate(["pet:"] * 16, params, use_tqdm=False)):
        Pet.model_validate_json(text)


def test_no_special_token_inside_a_structured_output(bundled_llm):
    special = bundled_llm.get_tokenizer().special_ids
    outputs = bundled_llm.generate(["ROMEO:"] * 16, structured(StructuredOutputsParams(json=RECORD_SCHEMA)),
                                   use_tqdm=False)
    for o in outputs:
        c = o.outputs[0]
        inside = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids  # the last is EOS
        assert not special & set(inside)


def test_seeded_and_greedy_requests_match_alone_and_in_a_mixed_batch(random_llm):
    schema = structured(StructuredOutputsParams(json=RECORD_SCHEMA), seed=5, top_p=0.9, top_k=50)
    greedy_regex = structured(StructuredOutputsParams(regex=EMAIL), temperature=0.0)
    alone = [random_llm.generate(["mixed:"], p, use_tqdm=False)[0].outputs[0].token_ids
             for p in (schema, greedy_regex)]
    others = [SamplingParams(max_tokens=30, temperature=1.0), structured(StructuredOutputsParams(choice=["x", "yz"]))]
    prompts = ["mixed:", "other prompt", "mixed:", "third"]
    batch = random_llm.generate(prompts, [schema, others[0], greedy_regex, others[1]], use_tqdm=False)
    assert [batch[0].outputs[0].token_ids, batch[2].outputs[0].token_ids] == alone


def test_preemption_chunked_prefill_and_prefix_caching_give_the_same_outputs(tmp_path_factory):
    from checkpoints import write_checkpoint
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "d4", seq_len=256)
    params = [structured(StructuredOutputsParams(json=RECORD_SCHEMA), seed=i) for i in range(12)]
    prompts = ["a shared prefix that fills blocks " + str(i) for i in range(12)]
    roomy = LLM(ckpt, max_num_seqs=16).generate(prompts, params, use_tqdm=False)
    tight_llm = LLM(ckpt, max_num_seqs=16, num_blocks=40, block_size=16, max_num_batched_tokens=32)
    tight = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    for text in finished_texts(tight):
        jsonschema.validate(json.loads(text), RECORD_SCHEMA)


def test_max_tokens_mid_structure_returns_the_partial_text(random_llm):
    out = random_llm.generate(["cut:"], structured(StructuredOutputsParams(json=RECORD_SCHEMA), max_tokens=8),
                              use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, len(out.token_ids)) == ("length", 8)
    assert out.text.startswith('{"id": ')


def test_a_stop_string_ends_a_structured_output_early(random_llm):
    out = random_llm.generate(["stop:"], structured(StructuredOutputsParams(json=RECORD_SCHEMA), stop=['"kind"']),
                              use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", '"kind"')
    assert out.text.startswith('{"id": ') and out.text.endswith(", ")


def test_a_delta_stream_adds_up_to_the_final_output(random_llm):
    params = structured(StructuredOutputsParams(json=RECORD_SCHEMA), seed=3, output_kind=RequestOutputKind.DELTA)
    random_llm.add_request("stream:", params, request_id="stream")
    text, final = "", None
    while random_llm.has_unfinished_requests():
        for out in random_llm.step():
            text += out.outputs[0].text
            final = out if out.finished else final
    expected = random_llm.generate(["stream:"], structured(StructuredOutputsParams(json=RECORD_SCHEMA), seed=3),
                                   use_tqdm=False)[0].outputs[0]
    assert (text, final.outputs[0].finish_reason) == (expected.text, expected.finish_reason)


def test_each_distinct_constraint_compiles_once(random_llm):
    schema = dict(RECORD_SCHEMA, title="compiled once")
    before = random_llm.engine.grammars.compiled.cache_info()
    params = [structured(StructuredOutputsParams(json=schema), max_tokens=4) for _ in range(50)]
    random_llm.generate(["x"] * 50, params, use_tqdm=False)
    after = random_llm.engine.grammars.compiled.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 49)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of json, regex, choice, grammar, json_object; got none"),
    (dict(regex="a", choice=["a"]), "got regex, choice"),
    (dict(choice=[]), "choice must hold at least one str"),
])
def test_not_exactly_one_constraint_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(regex=3), TypeError, "structured_outputs.regex must be a str"),
    (dict(choice=["a", 1]), TypeError, r"structured_outputs.choice\[1\] must be a str"),
    (dict(json=[1]), TypeError, "structured_outputs.json must be a JSON schema"),
    (dict(json={"type": object}), TypeError, "structured_outputs.json must be a JSON schema"),
])
def test_constraints_of_the_wrong_type_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("constraint, field", [
    (StructuredOutputsParams(regex="a(b"), "regex"),
    (StructuredOutputsParams(json="{not json"), "json"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
])
def test_a_bad_constraint_fails_generate_and_queues_nothing(random_llm, constraint, field):
    good = structured(StructuredOutputsParams(regex="ok"))
    with pytest.raises(ValueError, match=f"structured_outputs.{field} is not valid"):
        random_llm.generate(["first", "second"], [good, structured(constraint)], use_tqdm=False)
    assert not random_llm.has_unfinished_requests()


def test_a_bad_constraint_is_refused_in_xgrammars_words_without_its_time_and_source_line(random_llm):
    with pytest.raises(ValueError) as raised:
        random_llm.generate(["x"], structured(StructuredOutputsParams(json={"type": "nope"})), use_tqdm=False)
    assert str(raised.value) == 'structured_outputs.json is not valid: Unsupported type "nope"'


@pytest.mark.parametrize("kwargs, message", [
    (dict(tools=lambda expression: None), "tools and structured_outputs exclude each other"),
    (dict(ignore_eos=True), "ignore_eos=True and structured_outputs exclude each other"),
    (dict(structured_outputs={"json": {}}), "structured_outputs must be a StructuredOutputsParams"),
])
def test_sampling_params_that_fight_a_constraint_are_refused(kwargs, message):
    kwargs.setdefault("structured_outputs", StructuredOutputsParams(regex="a"))
    with pytest.raises((ValueError, TypeError), match=message):
        SamplingParams(**kwargs)


def test_beam_search_takes_no_constraint():
    with pytest.raises(TypeError, match="structured_outputs"):
        BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs=StructuredOutputsParams(regex="a"))


def test_other_shaping_that_leaves_the_grammar_no_token_aborts_the_output(random_llm):
    tokenizer = random_llm.get_tokenizer()
    params = structured(StructuredOutputsParams(regex="ab"), allowed_token_ids=tokenizer.encode("x", prepend_bos=False))
    assert random_llm.generate(["p"], params, use_tqdm=False)[0].outputs[0].finish_reason == "abort"
    assert not random_llm.has_unfinished_requests()


def test_without_xgrammar_a_constrained_request_says_what_to_install(random_llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[structured]"')):
        random_llm.generate(["p"], structured(StructuredOutputsParams(regex="never parsed before")), use_tqdm=False)


def test_unconstrained_requests_never_need_xgrammar(random_llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    out = random_llm.generate(["p"] * 4, SamplingParams(max_tokens=4, temperature=1.0), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) for o in out)


def test_overhead_benchmark_times_both_batches(checkpoint_dir, capsys):
    from benchmarks import structured_overhead
    structured_overhead.main(["--model", str(checkpoint_dir), "--num-seqs", "4", "--steps", "2"])
    report = capsys.readouterr().out
    assert "none constrained:" in report and "half held to a JSON schema:" in report and "overhead:" in report
