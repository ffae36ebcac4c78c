"""Speculative decoding of requests with a structured output: guesses checked against the grammar.

A constrained sequence's guesses go through its grammar before the step: the step
checks only the leading guesses the grammar allows, each checked row is masked as the
matcher would be after the guesses before it, and the matcher ends up where the
committed tokens alone take it. Outputs are those of a run without speculation.
"""

import pytest
import torch

from test_speculative import (PROPOSERS, REPEATING, OracleProposer, Reference, assert_same_outputs, check_both_ways,
                              spec_llm)

from microvllm import LLM, SamplingParams, StructuredOutputsParams
from microvllm.engine.features import request_features
from microvllm.engine.request_feature import TokenUpdate
from microvllm.engine.sequence import Request, Sequence
from microvllm.engine.structured_output import StructuredOutput
from microvllm.sampling_params import RequestOutputKind
from microvllm.speculative.ahead import rows_ahead
from microvllm.structured.bitmasks import GrammarBitmasks
from microvllm.structured.grammars import new_matcher

pytest.importorskip("xgrammar")

RECORD = {"type": "object",
          "properties": {"kind": {"enum": ["ab", "cd"]},
                         "tags": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 6}},
          "required": ["kind", "tags"], "additionalProperties": False}
CONSTRAINTS = {"json": StructuredOutputsParams(json=RECORD),
               "regex": StructuredOutputsParams(regex="(ab|cd){2,8}"),
               "choice": StructuredOutputsParams(choice=["abcabc", "cabcab", "bcabca"])}
SAMPLING = {"greedy": dict(temperature=0), "seeded": dict(temperature=1.0)}
LETTERS = StructuredOutputsParams(regex="[a-e]{3,12}")


def constrained(constraint: StructuredOutputsParams, sampling: str, max_tokens: int = 40) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, structured_outputs=constraint, seed=seed, **SAMPLING[sampling])
            for seed in range(len(REPEATING))]


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("kind", CONSTRAINTS)
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_constrained_outputs_are_unchanged(checkpoint_dir, proposer, kind, sampling):
    check_both_ways(checkpoint_dir, proposer, REPEATING, constrained(CONSTRAINTS[kind], sampling))


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_oracle_guesses_of_constrained_requests_are_all_accepted(checkpoint_dir, kind, sampling):
    llm = check_both_ways(checkpoint_dir, "oracle", REPEATING, constrained(CONSTRAINTS[kind], sampling))
    stats = llm.engine.stats
    assert stats.acceptance_rate == 1.0 and stats.spec_decode_num_draft_tokens > 0
    assert stats.mean_accepted_length > 2


def test_the_stop_token_is_guessed_and_accepted_where_the_grammar_ends(checkpoint_dir):
    params = constrained(CONSTRAINTS["choice"], "seeded")
    want = LLM(checkpoint_dir).generate(REPEATING, params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in want)
    llm = spec_llm(checkpoint_dir, "oracle", Reference(REPEATING, want))
    assert_same_outputs(llm.generate(REPEATING, params, use_tqdm=False), want)
    stats = llm.engine.stats
    # 6 letters and the stop token: the first sampled, 4 guessed, then the stop token guessed
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens == 5 * len(REPEATING)
    assert stats.steps == 3


def test_ngram_guesses_follow_a_grammar_that_repeats_itself(checkpoint_dir):
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex="(abc){10}"))
    stats = check_both_ways(checkpoint_dir, "ngram", REPEATING, params).engine.stats
    assert stats.acceptance_rate > 0.8 and stats.mean_accepted_length > 2.5


class RefusedTailProposer(OracleProposer):
    """The oracle's guesses with the last replaced by a byte the grammar never allows."""

    def propose(self, seqs, num_guesses):
        return [[*guesses[:-1], ord("z")] if guesses else [] for guesses in super().propose(seqs, num_guesses)]


def test_a_guess_the_grammar_refuses_is_dropped_before_the_step(checkpoint_dir):
    params = constrained(LETTERS, "seeded", max_tokens=20)
    want = LLM(checkpoint_dir).generate(REPEATING, params, use_tqdm=False)
    llm = LLM(checkpoint_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    llm.engine.speculator.proposer = RefusedTailProposer(Reference(REPEATING, want))
    assert_same_outputs(llm.generate(REPEATING, params, use_tqdm=False), want)
    stats = llm.engine.stats
    # had the refused guesses been checked, the model would have rejected them
    assert stats.acceptance_rate == 1.0 and stats.spec_decode_num_draft_tokens > 0


# -- the feature, one sequence at a time ---------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from checkpoints import write_checkpoint
    return LLM(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "d4")).engine


def constrained_sequence(engine, constraint: StructuredOutputsParams) -> Sequence:
    params = SamplingParams(structured_outputs=constraint)
    features = request_features(params, RequestOutputKind.FINAL_ONLY, engine.tokenizer, engine.grammars)
    prompt = engine.tokenizer.encode("hi")
    return Sequence(0, Request("r", None, prompt, params, features=features), 0, list(prompt), seed=0)


def allowed(masks: list, vocab_size: int = 265) -> torch.Tensor:
    """Which tokens each row's mask allows, as the sampler applies it (the test tokenizer's 265)."""
    logits = torch.zeros(len(masks), vocab_size)
    return GrammarBitmasks().apply(logits, masks) == 0


def grammar_of(seq: Sequence) -> StructuredOutput:
    return next(f for f in seq.request.features.items if isinstance(f, StructuredOutput))


def matcher_after(seq: Sequence, tokens: list[int]):
    matcher = new_matcher(grammar_of(seq).compiled_grammar)
    assert all(matcher.accept_token(t) for t in tokens)
    return matcher


def test_only_the_guesses_before_the_first_refused_one_are_checked(engine):
    seq = constrained_sequence(engine, LETTERS)
    guesses = engine.tokenizer.encode("abzc", prepend_bos=False)
    assert seq.request.features.check_guesses(seq, guesses) == guesses[:2]


def test_each_checked_row_is_masked_as_the_grammar_stands_after_the_guesses_before_it(engine):
    seq = constrained_sequence(engine, CONSTRAINTS["regex"])
    guesses = engine.tokenizer.encode("abcd", prepend_bos=False)
    assert seq.request.features.check_guesses(seq, guesses) == guesses
    rows = [seq.request.features.logits_mask(view) for view in rows_ahead(seq, guesses)]
    want = [matcher_after(seq, guesses[:j]) for j in range(len(guesses) + 1)]
    assert torch.equal(allowed(rows), allowed(want))
    assert not torch.equal(allowed(rows[:1]), allowed(rows[1:2]))  # the grammar moves: "a" needs "b"


def test_checking_guesses_leaves_the_matcher_where_it_was(engine):
    seq = constrained_sequence(engine, CONSTRAINTS["regex"])
    features = seq.request.features
    done = engine.tokenizer.encode("ab", prepend_bos=False)
    for token in done:  # committed as a step commits them
        seq.token_ids.append(token)
        grammar_of(seq).commit(seq, TokenUpdate(seq))
    features.check_guesses(seq, engine.tokenizer.encode("cdab", prepend_bos=False))
    assert torch.equal(allowed([features.logits_mask(seq)]), allowed([matcher_after(seq, done)]))
    seq.token_ids.append(engine.tokenizer.encode("a", prepend_bos=False)[0])
    grammar_of(seq).commit(seq, TokenUpdate(seq))  # not "c", which the guesses had taken it past
    assert torch.equal(allowed([features.logits_mask(seq)]), allowed([matcher_after(seq, seq.output_token_ids)]))


def test_no_guess_is_checked_past_the_stop_token(engine):
    seq = constrained_sequence(engine, StructuredOutputsParams(choice=["ab"]))
    eos = min(engine.tokenizer.eos_token_ids)
    guesses = [*engine.tokenizer.encode("ab", prepend_bos=False), eos, *engine.tokenizer.encode("a", prepend_bos=False)]
    assert seq.request.features.check_guesses(seq, guesses) == guesses[:3]
    # the row after the stop token is never emitted: the grammar no longer masks it
    assert seq.request.features.logits_mask(rows_ahead(seq, guesses[:3])[-1]) is None
