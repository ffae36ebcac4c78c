"""microvllm.nanochat.Engine keeps nanochat's Engine calls and conventions: rows start with
the prompt, masks are 0 on the prompt and on forced tokens, the terminal token is yielded
by generate and left out by generate_batch, and greedy rows equal nanochat's own."""

import dataclasses
import random

import pytest
import torch
from helpers import nanochat_engine_or_skip, tool_answer, tool_call, writing

from microvllm import LLM, SamplingParams
from microvllm import nanochat as adapter
from microvllm.nanochat import Engine

MAX_TOKENS = 24
ASSISTANT_END = 260   # in the tests' 265-token vocabulary


def prompts_for(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(256) for _ in range(rng.randint(3, 20))] for _ in range(count)]


# with <|assistant_end|> made likelier, some greedy rows of these prompts end after a few
# tokens (one at once) and the others run to MAX_TOKENS: both ways a row ends are covered
PROMPTS = prompts_for(0, 8)


def ending_checkpoint(make_checkpoint, era: str = "E"):
    """A random checkpoint whose <|assistant_end|> logit is scaled up, so some rows end."""
    directory = make_checkpoint(era=era)
    path = next(directory.glob("model_*.pt"))
    state = torch.load(path, weights_only=True)
    state["lm_head.weight"][ASSISTANT_END] *= 4
    torch.save(state, path)
    return directory


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return ending_checkpoint(make_checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(checkpoint, block_size=16)


def greedy_batch(engine: Engine, prompt: list[int], num_samples: int = 2):
    return engine.generate_batch(prompt, num_samples=num_samples, max_tokens=MAX_TOKENS, temperature=0.0)


def test_generate_batch_rows_start_with_the_prompt_and_masks_are_0_on_it(engine):
    results, masks = engine.generate_batch(PROMPTS[0], num_samples=3, max_tokens=MAX_TOKENS, top_k=50)
    assert len(results) == len(masks) == 3
    for tokens, mask in zip(results, masks):
        assert tokens[:len(PROMPTS[0])] == PROMPTS[0]
        assert len(mask) == len(tokens)
        assert mask[:len(PROMPTS[0])] == [0] * len(PROMPTS[0])


def test_generate_batch_leaves_the_terminal_token_out(engine):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    ended = [(p, o.outputs[0].token_ids) for p, o in zip(PROMPTS, outputs) if o.outputs[0].finish_reason == "stop"]
    assert ended, "no prompt's row ended: the test checkpoint no longer covers the case"
    for prompt, token_ids in ended:
        assert token_ids[-1] == ASSISTANT_END
        (row, *_), (mask, *_) = greedy_batch(engine, prompt)
        assert row == prompt + token_ids[:-1]
        assert mask == [0] * len(prompt) + [1] * (len(token_ids) - 1)


def test_generate_yields_the_greedy_rows_then_the_terminal_token(engine):
    for prompt in PROMPTS:
        (row, *_), _ = greedy_batch(engine, prompt)
        columns = list(engine.generate(prompt, num_samples=2, max_tokens=MAX_TOKENS, temperature=0.0))
        tokens = [column for column, _ in columns]
        assert all(column[0] == column[1] for column in tokens)
        generated = [column[0] for column in tokens]
        if len(row) - len(prompt) < MAX_TOKENS:   # ended: the terminal token comes last
            assert generated == row[len(prompt):] + [ASSISTANT_END]
        else:
            assert generated == row[len(prompt):]
        assert all(masks == [1, 1] for _, masks in columns)


def test_an_ended_row_repeats_its_last_token_masked_0(engine):
    # sampled rows end at different columns
    columns = list(engine.generate(PROMPTS[2], num_samples=8, max_tokens=MAX_TOKENS, top_k=50, seed=3))
    rows = list(zip(*(column for column, _ in columns)))
    masks = list(zip(*(mask for _, mask in columns)))
    ended = [i for i, row in enumerate(rows) if ASSISTANT_END in row]
    assert ended and len(columns) > min(rows[i].index(ASSISTANT_END) for i in ended) + 1
    for i in ended:
        end = rows[i].index(ASSISTANT_END)
        assert set(rows[i][end:]) == {ASSISTANT_END}
        assert set(masks[i][end + 1:]) <= {0} and masks[i][end] == 1


def test_generate_stops_at_max_tokens_columns(engine):
    assert len(list(engine.generate(PROMPTS[0], num_samples=2, max_tokens=5, top_k=50))) == 5


def test_stopping_a_stream_early_aborts_its_request(engine):
    stream = engine.generate(PROMPTS[0], num_samples=2, max_tokens=MAX_TOKENS)
    next(stream)
    stream.close()
    assert not engine.llm.has_unfinished_requests()


def test_generate_many_equals_generate_batch_per_prompt_for_greedy(engine):
    many = engine.generate_many(PROMPTS, num_samples=2, max_tokens=MAX_TOKENS, temperature=0.0)
    assert many == [greedy_batch(engine, p) for p in PROMPTS]


def test_same_seed_same_samples_other_seed_other_samples(engine):
    def sample(seed):
        return engine.generate_batch(PROMPTS[0], num_samples=4, max_tokens=MAX_TOKENS, top_k=50, seed=seed)
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert engine.generate_many(PROMPTS[:2], num_samples=4, max_tokens=MAX_TOKENS, top_k=50, seed=[7, 9])[0] == sample(7)


def test_a_calculator_answer_is_forced_and_masked_0(engine, monkeypatch):
    script, answer = tool_call(engine.llm.tokenizer, "6*7"), tool_answer(engine.llm.tokenizer, "42")

    # the adapter's own params (tools="auto" included), with the model made to call the calculator
    build = adapter.sampling_params
    monkeypatch.setattr(adapter, "sampling_params", lambda *args: dataclasses.replace(
        build(*args), logits_processors=[writing(script)], ignore_eos=True))
    n = len(script) + len(answer) + 2
    (row,), (mask,) = engine.generate_batch(PROMPTS[0], max_tokens=n, temperature=0.0)
    assert row[len(PROMPTS[0]):][:len(script) + len(answer)] == script + answer
    assert mask[len(PROMPTS[0]):] == [1] * len(script) + [0] * len(answer) + [1, 1]
    columns = list(engine.generate(PROMPTS[0], max_tokens=n, temperature=0.0))
    assert [c[0] for c, _ in columns] == row[len(PROMPTS[0]):]
    assert [m[0] for _, m in columns] == mask[len(PROMPTS[0]):]


@pytest.mark.parametrize("era", ["A", "B", "C", "D", "E"])
def test_every_era_runs_and_equals_llm_generate_greedy(make_checkpoint, era):
    llm = LLM(ending_checkpoint(make_checkpoint, era), block_size=16)
    prompts = PROMPTS[:4]
    many = Engine(llm).generate_many(prompts, max_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, ((row,), _), out in zip(prompts, many, outputs):
        token_ids = out.outputs[0].token_ids
        assert row == prompt + (token_ids[:-1] if out.outputs[0].finish_reason == "stop" else token_ids)


def test_greedy_rows_and_masks_equal_nanochats_engine(checkpoint):
    """Needs NANOCHAT_SRC: a nanochat checkout whose dependencies import here."""
    theirs = nanochat_engine_or_skip(checkpoint)
    ours = Engine(checkpoint, block_size=16)
    for prompt in PROMPTS:
        assert greedy_batch(ours, prompt) == greedy_batch(theirs, prompt)
        want = list(theirs.generate(prompt, num_samples=2, max_tokens=MAX_TOKENS, temperature=0.0))
        got = list(ours.generate(prompt, num_samples=2, max_tokens=MAX_TOKENS, temperature=0.0))
        assert got == want
