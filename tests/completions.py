"""Generated completions in a form that compares as the determinism tests need."""

import random

import pytest

from microvllm import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


def make_prompts(count, seed=0, shared_prefix=()):
    rng = random.Random(seed)
    return [list(shared_prefix) + [rng.randrange(256) for _ in range(rng.randrange(1, 40))]
            for _ in range(count)]


class Completion:
    """Token ids compared exactly, log-probs to 1e-4."""

    def __init__(self, output):
        self.token_ids = output.token_ids
        self.logprobs = [e[t].logprob for e, t in zip(output.logprobs or [], output.token_ids)]

    def __eq__(self, other):
        return self.token_ids == other.token_ids and self.logprobs == pytest.approx(other.logprobs, abs=1e-4)

    def __repr__(self):
        return f"Completion({self.token_ids})"


def completions(llm, prompts, params=GREEDY):
    return [Completion(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]


def varied_lengths(count, seed=0):
    """Greedy params whose max_tokens vary, so requests finish at different steps."""
    rng = random.Random(seed)
    return [SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True, logprobs=0)
            for _ in range(count)]
