"""DraftProposer on its own: its guesses are the draft model's samples drawn with the
target's noise, its mirrors follow their targets through rejected guesses, and it
refuses a draft whose tokenizer differs from the target's."""

from pathlib import Path

import pytest
import tiktoken
import torch

from benchmarks.random_checkpoint import SPLIT_PATTERN, save_checkpoint, tokenizer_with_vocab
from checkpoints import byte_tokenizer, load_reference
from helpers import make_prompts
from microvllm import LLM, SamplingParams
from microvllm.engine.sequence import Sequence
from microvllm.model.loader import load_model
from microvllm.speculative.draft import DraftProposer
from microvllm.speculative.guess_payoff import MIN_PAYOFF_SAMPLES, PAYOFF_WINDOW, PROBE_EVERY, GuessPayoff
from microvllm.tokenizer import SPECIAL_TOKENS, Tokenizer

PROMPTS = [[7, 100, 42, 9], [200, 3, 3, 18, 61, 90], [65, 66, 67], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(model=str(checkpoint_dir), enable_prefix_caching=False)


@pytest.fixture(scope="module")
def perturbed_dir(checkpoint_dir, tmp_path_factory):
    """The target's weights plus a little noise: a draft close to the target, not equal."""
    state, config = load_reference(checkpoint_dir)
    gen = torch.Generator().manual_seed(5)
    noisy = {name: w + 0.1 * w.float().std() * torch.randn(w.shape, generator=gen) if w.numel() > 1 else w
             for name, w in state.items()}
    return save_checkpoint(tmp_path_factory.mktemp("draft") / "perturbed", 100, config, noisy, byte_tokenizer())


def proposer(llm, draft_dir, k=4) -> DraftProposer:
    """A draft proposer beside `llm`'s engine that guesses whenever asked, whatever its
    guesses' payoff so far (GuessPayoff, tested apart)."""
    engine = llm.engine
    draft = DraftProposer(str(draft_dir), k, engine.tokenizer, engine.dtype, engine.device, engine.platform)
    draft.payoff.pays = lambda num_seqs: True
    return draft


def generated(llm, prompt, params) -> Sequence:
    """The engine's finished sequence for `prompt`: its seed is the engine's own."""
    request_id = llm.engine.add_request(None, prompt, params)
    request = llm.engine.output_processor.requests[request_id]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    return request.sequences[0]


def prefix(seq: Sequence, num_output_tokens: int, seed: int | None = None) -> Sequence:
    """`seq` as it was after `num_output_tokens` tokens (with another seed, if given)."""
    prompt = seq.token_ids[:seq.num_prompt_tokens]
    view = Sequence(seq.seq_id, seq.request, seq.index, list(prompt), seq.seed if seed is None else seed)
    view.token_ids += seq.output_token_ids[:num_output_tokens]
    return view


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_draft_equal_to_the_target_proposes_the_targets_own_continuation(llm, checkpoint_dir, params):
    draft = proposer(llm, checkpoint_dir)
    targets = [generated(llm, prompt, params) for prompt in PROMPTS]
    views = [prefix(seq, j) for seq in targets for j in (0, 5, 17)]
    guesses = draft.propose(views, [4] * len(views))
    assert guesses == [seq.output_token_ids[j:j + 4] for seq in targets for j in (0, 5, 17)]


def test_a_close_draft_agrees_with_the_target_far_more_often_with_its_noise(llm, perturbed_dir):
    targets = [generated(llm, prompt, SEEDED) for prompt in PROMPTS]
    positions = [(seq, j) for seq in targets for j in range(SEEDED.max_tokens)]

    def agreement(seed_of) -> float:
        views = [prefix(seq, j, seed_of(seq)) for seq, j in positions]
        guesses = proposer(llm, perturbed_dir).propose(views, [1] * len(views))
        return sum(g == seq.output_token_ids[j:j + 1] for g, (seq, j) in zip(guesses, positions)) / len(positions)

    shared, independent = agreement(lambda seq: seq.seed), agreement(lambda seq: seq.seed + 1)
    assert shared > 0.6 and shared > 2 * independent, (shared, independent)


@pytest.mark.parametrize("num_accepted", [0, 2, 4])
def test_after_a_rejection_the_next_guesses_equal_a_fresh_proposers(llm, checkpoint_dir, perturbed_dir,
                                                                     num_accepted):
    target = generated(llm, PROMPTS[1], SEEDED)
    seq = prefix(target, 3)
    draft = proposer(llm, perturbed_dir)
    guesses = draft.propose([seq], [4])[0]
    assert len(guesses) == 4
    # the target keeps some guesses, then samples a token of its own
    seq.token_ids += guesses[:num_accepted] + [(guesses[num_accepted] + 1) % 256 if num_accepted < 4 else 5]
    assert draft.propose([seq], [4]) == proposer(llm, perturbed_dir).propose([seq], [4])


def test_guesses_end_at_a_stop_token_and_within_max_tokens(llm, checkpoint_dir):
    eos = llm.get_tokenizer().bos_id
    ends_third = lambda output_ids, logits: torch.where(  # noqa: E731
        torch.arange(len(logits)) == eos, 0.0, -1e9) if len(output_ids) == 2 else logits
    draft = proposer(llm, checkpoint_dir)
    stopping = SamplingParams(temperature=0, logits_processors=[ends_third])
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    seqs = [generated(llm, PROMPTS[0], p) for p in (stopping, short)]
    stopped, limited = draft.propose([prefix(seq, 0) for seq in seqs], [6, 6])
    assert len(stopped) == 3 and stopped[-1] == eos
    assert len(limited) == 3


def test_a_sequence_asked_for_no_guesses_gets_none_after_earlier_ones(llm, checkpoint_dir):
    draft = proposer(llm, checkpoint_dir)
    seq = prefix(generated(llm, PROMPTS[0], GREEDY), 2)
    assert len(draft.propose([seq], [4])[0]) == 4
    seq.token_ids.append(seq.token_ids[-1])  # the target rejected every guess
    assert draft.propose([seq], [0]) == [[]]


def test_guesses_stop_while_they_slow_their_sequences_and_are_probed_ever_more_seldom():
    payoff = GuessPayoff()
    size = (8).bit_length()
    assert [payoff.pays(8) for _ in range(4)] == [True, False, True, False]  # learning: every other call
    payoff.rates[True][size].extend([90.0] * MIN_PAYOFF_SAMPLES)   # tokens/s per sequence, guessing
    payoff.rates[False][size].extend([100.0] * MIN_PAYOFF_SAMPLES)  # and not
    decisions = [payoff.pays(8) for _ in range(3 * PROBE_EVERY)]
    # a probe after PROBE_EVERY calls; it changes nothing, so the next comes twice as late
    assert [i for i, d in enumerate(decisions) if d] == [PROBE_EVERY - 1, 3 * PROBE_EVERY - 1]
    assert payoff.pays(1)  # a batch of another size is judged apart
    payoff.rates[True][size].extend([150.0] * PAYOFF_WINDOW)
    assert all(payoff.pays(8) for _ in range(PROBE_EVERY))


def test_the_payoff_reads_tokens_per_second_since_the_last_call(llm):
    payoff = GuessPayoff()
    seq = prefix(generated(llm, PROMPTS[0], GREEDY), 2)
    payoff.record([seq], call_start=10.0, guessed=True)
    seq.token_ids += [1, 2, 3]  # the target's step kept two guesses and added its own token
    payoff.record([seq], call_start=10.5, guessed=False)
    assert list(payoff.rates[True][1]) == [6.0] and not payoff.rates[False][1]


def test_a_proposer_whose_guesses_do_not_pay_proposes_nothing(llm, checkpoint_dir):
    draft = proposer(llm, checkpoint_dir)
    draft.payoff.pays = lambda num_seqs: False
    seqs = [prefix(generated(llm, prompt, GREEDY), 2) for prompt in PROMPTS[:2]]
    assert draft.propose(seqs, [4, 4]) == [[], []]


def test_release_frees_the_mirrors_blocks(llm, checkpoint_dir):
    draft = proposer(llm, checkpoint_dir)
    blocks = draft.block_manager
    seqs = [prefix(generated(llm, prompt, GREEDY), 2) for prompt in PROMPTS[:2]]
    draft.propose(seqs, [4, 4])
    held = [len(draft.mirrors[seq].seq.block_table) for seq in seqs]
    assert blocks.num_used_blocks == sum(held) > 0
    draft.release(seqs[0])
    assert blocks.num_used_blocks == held[1]
    draft.release(seqs[1])
    assert blocks.num_used_blocks == 0 and not draft.mirrors


def test_a_mirror_without_room_in_the_kv_cache_proposes_nothing(llm, checkpoint_dir, monkeypatch):
    monkeypatch.setattr("microvllm.speculative.draft.cpu_kv_blocks", lambda *args: 1)
    draft = proposer(llm, checkpoint_dir)
    long_prompt = list(range(3, 3 + 2 * draft.block_manager.block_size))
    seqs = [prefix(generated(llm, prompt, GREEDY), 0) for prompt in (PROMPTS[0], long_prompt)]
    fits, does_not = draft.propose(seqs, [2, 2])
    assert len(fits) == 2 and does_not == []


def swapped_bytes_tokenizer() -> tiktoken.Encoding:
    """As byte_tokenizer, the same size, but with bytes 0 and 1 under each other's ids."""
    ranks = {bytes([b]): b for b in range(256)} | {b"\x00": 1, b"\x01": 0}
    special = {token: byte_tokenizer().encode_single_token(token) for token in SPECIAL_TOKENS}
    return tiktoken.Encoding(name="swapped", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


@pytest.mark.parametrize("target_tokenizer", [
    lambda: Tokenizer(tokenizer_with_vocab(300)),
    lambda: Tokenizer(swapped_bytes_tokenizer())], ids=["other-size", "same-size-other-bytes"])
def test_a_draft_with_another_tokenizer_is_refused(llm, checkpoint_dir, target_tokenizer):
    engine = llm.engine
    with pytest.raises(ValueError, match="speculative_config.model"):
        DraftProposer(str(checkpoint_dir), 4, target_tokenizer(), engine.dtype, engine.device, engine.platform)


def test_a_missing_draft_dir_names_the_setting(llm, tmp_path):
    with pytest.raises(FileNotFoundError, match="speculative_config.model"):
        proposer(llm, tmp_path / "missing")


# -- through the engine: LLM(speculative_config={"model": DRAFT_DIR, ...}) ---------------

def draft_llm(target_dir, draft_dir, monkeypatch, **kwargs) -> LLM:
    """A target with a draft that guesses whatever the time its guesses take (which makes
    how many it guesses depend on the machine's load)."""
    llm = LLM(str(target_dir), speculative_config={"model": str(draft_dir), "num_speculative_tokens": 4}, **kwargs)
    monkeypatch.setattr(llm.engine.speculator.proposer.payoff, "pays", lambda num_seqs: True)
    return llm


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_draft_speculation_leaves_outputs_unchanged(checkpoint_dir, perturbed_dir, params, monkeypatch):
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = LLM(str(checkpoint_dir)).generate(prompts, params, use_tqdm=False)
    llm = draft_llm(checkpoint_dir, perturbed_dir, monkeypatch)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    stats = llm.engine.stats
    assert stats.spec_decode_num_accepted_tokens > stats.spec_decode_num_draft_tokens / 2


def test_draft_speculation_leaves_n_samples_and_preempted_sequences_unchanged(checkpoint_dir, perturbed_dir,
                                                                             monkeypatch):
    prompts = [{"prompt_token_ids": p} for p in PROMPTS + make_prompts(6, seed=9)]
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    small_cache = dict(num_blocks=24, block_size=4)
    want = LLM(str(checkpoint_dir), **small_cache).generate(prompts, params, use_tqdm=False)
    llm = draft_llm(checkpoint_dir, perturbed_dir, monkeypatch, **small_cache)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert llm.engine.stats.preemptions > 0 and llm.engine.stats.spec_decode_num_accepted_tokens > 0


def test_a_draft_equal_to_the_target_has_every_seeded_guess_accepted(checkpoint_dir, monkeypatch):
    llm = draft_llm(checkpoint_dir, checkpoint_dir, monkeypatch)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SEEDED, use_tqdm=False)
    stats = llm.engine.stats
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0


def test_finished_sequences_leave_no_mirror_behind(checkpoint_dir, perturbed_dir, monkeypatch):
    llm = draft_llm(checkpoint_dir, perturbed_dir, monkeypatch)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SEEDED, use_tqdm=False)
    later = [11, 12, 13]
    llm.generate([{"prompt_token_ids": later}], GREEDY, use_tqdm=False)  # the first run's are released here
    draft = llm.engine.speculator.proposer
    assert all(seq.token_ids[:seq.num_prompt_tokens] == later for seq in draft.mirrors)
    assert draft.block_manager.num_used_blocks == sum(len(m.seq.block_table) for m in draft.mirrors.values())


# -- the bundled draft: models/shakespeare-d2-draft beside models/shakespeare-d4 -----------

MODELS = Path(__file__).resolve().parent.parent / "models"


def linear_weights(model_dir: Path) -> int:
    """Weights each token multiplies (lm_head included): a forward's FLOPs, halved."""
    return sum(m.weight.numel() for m in load_model(model_dir).modules() if isinstance(m, torch.nn.Linear))


def test_the_bundled_draft_costs_at_most_a_quarter_of_the_bundled_model_per_token():
    assert linear_weights(MODELS / "shakespeare-d2-draft") <= linear_weights(MODELS / "shakespeare-d4") / 4


def test_the_bundled_drafts_guesses_are_often_kept_at_temperature_1(monkeypatch):
    llm = draft_llm(MODELS / "shakespeare-d4", MODELS / "shakespeare-d2-draft", monkeypatch,
                    kv_cache_memory=32 * 2**20)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, ignore_eos=True) for i in range(4)]
    llm.generate(["ROMEO.\n", "JULIET.\n", "HAMLET.\n", "KING LEAR.\n"], params, use_tqdm=False)
    stats = llm.engine.stats
    assert stats.spec_decode_num_accepted_tokens > 0.4 * stats.spec_decode_num_draft_tokens
