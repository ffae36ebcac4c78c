"""CORE on microvllm: the bundle read as nanochat's base_eval reads it, prompts rendered as
nanochat's core_eval renders them, verdicts equal to a full-recompute reference in
float32, and (with $NANOCHAT_SRC naming a nanochat checkout) to nanochat's own
evaluate_example and evaluate_task on the same checkpoint."""

import csv
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from checkpoints import load_reference
from helpers import nanochat_engine_or_skip
from reference import reference_logits

from microvllm import LLM
from microvllm.core_eval import Task, evaluate_core, evaluate_tasks, read_bundle
from microvllm.core_eval.__main__ import main
from microvllm.core_eval.evaluate import continuation_logprobs, mean_loss, scoring_params
from microvllm.core_eval.prompts import rendered, scored_prompts

WORDS = ["red", "blue", "sky", "cat", "dog", "sun", "tree", "stone", "rain", "moon", "fish", "lamp"]
RANDOM_BASELINES = {"mc": 25.0, "schema": 50.0, "lm": 0.0}


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def examples(kind: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if kind == "mc":
        return [{"query": f"Q: {words(rng, 2)}?", "choices": rng.sample(WORDS, 4), "gold": rng.randrange(4)}
                for _ in range(count)]
    if kind == "schema":
        return [{"context_options": [words(rng, 2) for _ in range(2)], "continuation": words(rng, 1) + ".",
                 "gold": rng.randrange(2)} for _ in range(count)]
    # trailing whitespace in the context, as in some of nanochat's bundle's data; the
    # model favours "e" (see `checkpoint`), so some continuations are its argmax
    return [{"context": words(rng, rng.randint(3, 6)) + rng.choice(["", " ", "  "]),
             "continuation": rng.choice(["e", "ee", "sun"])} for _ in range(count)]


# (label, icl_task_type, num_fewshot, continuation_delimiter or None for the default)
TASKS = [("mc", "multiple_choice", 1, ": "), ("schema", "schema", 0, None), ("lm", "language_modeling", 2, "")]


def write_bundle(directory, count: int = 12):
    (directory / "eval_data").mkdir(parents=True)
    entries = []
    for seed, (label, task_type, shots, delimiter) in enumerate(TASKS):
        lines = [json.dumps(e) for e in examples(label, count, seed)]
        (directory / "eval_data" / f"{label}.jsonl").write_text("\n".join(lines) + "\n")
        entry = f"- label: {label}\n  dataset_uri: {label}.jsonl\n  num_fewshot: [{shots}]\n  icl_task_type: {task_type}\n"
        if delimiter is not None:
            entry += f"  continuation_delimiter: {json.dumps(delimiter)}\n"
        entries.append(entry)
    (directory / "core.yaml").write_text("icl_tasks:\n" + "".join(entries))
    with open(directory / "eval_meta_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for label, baseline in RANDOM_BASELINES.items():
            writer.writerow([label, "test", "test", 0, count, baseline])
    return directory


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def checkpoint_dir(make_checkpoint):
    """A random checkpoint whose "e" logit is scaled up: "e" is the argmax at about
    half the positions, so language-modeling verdicts are a mix of right and wrong."""
    directory = make_checkpoint()
    path = next(directory.glob("model_*.pt"))
    state = torch.load(path, weights_only=True)
    state["lm_head.weight"][ord("e")] *= 3
    torch.save(state, path)
    return directory


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(checkpoint_dir, block_size=16)


def task(task_type: str, data: list[dict], num_fewshot: int = 0, delimiter: str = " ") -> Task:
    return Task("t", task_type, num_fewshot, delimiter, data, 0.0)


# -- the bundle ----------------------------------------------------------------------------

def test_read_bundle_shuffles_each_task_with_base_evals_seed_then_cuts_to_max_per_task(bundle):
    tasks = read_bundle(bundle, max_per_task=5)
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter) for t in tasks] == \
        [(label, task_type, shots, " " if delimiter is None else delimiter) for label, task_type, shots, delimiter in TASKS]
    for t in tasks:
        data = [json.loads(line) for line in (bundle / "eval_data" / f"{t.label}.jsonl").read_text().splitlines()]
        random.Random(1337).shuffle(data)
        assert t.data == data[:5]
        assert t.random_baseline == RANDOM_BASELINES[t.label]


@pytest.mark.parametrize("max_per_task", [0, -2])
def test_max_per_task_is_minus_1_or_positive(bundle, max_per_task):
    with pytest.raises(ValueError, match="max_per_task"):
        read_bundle(bundle, max_per_task)


def test_a_bundle_without_its_files_names_the_missing_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        read_bundle(tmp_path)


def test_a_task_without_a_random_baseline_is_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    rows = (bundle / "eval_meta_data.csv").read_text().splitlines()
    (bundle / "eval_meta_data.csv").write_text("\n".join(r for r in rows if not r.startswith("lm,")))
    with pytest.raises(ValueError, match="no row for task 'lm'"):
        read_bundle(bundle)


def test_an_unknown_task_type_is_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    config = bundle / "core.yaml"
    config.write_text(config.read_text().replace("icl_task_type: schema", "icl_task_type: generation"))
    with pytest.raises(ValueError, match="'generation' is not one of"):
        read_bundle(bundle)


def test_more_shots_than_other_examples_is_refused(tmp_path):
    bundle = write_bundle(tmp_path, count=2)
    with pytest.raises(ValueError, match="num_fewshot"):
        read_bundle(bundle)


# -- prompts -------------------------------------------------------------------------------

def test_multiple_choice_prompts_are_the_shots_then_query_delimiter_choice():
    data = [{"query": "Q0", "choices": ["a", "b"], "gold": 1},
            {"query": "Q1", "choices": ["c", "d"], "gold": 0},
            {"query": "Q2", "choices": ["e", "f"], "gold": 1}]
    shot = random.Random(1234 + 2).sample([0, 1], 1)[0]
    gold = data[shot]["choices"][data[shot]["gold"]]
    assert rendered(task("multiple_choice", data, 1, ": "), 2) == \
        [f"Q{shot}: {gold}\n\nQ2: e", f"Q{shot}: {gold}\n\nQ2: f"]


def test_schema_prompts_vary_the_context_and_keep_the_continuation():
    data = [{"context_options": ["A x", "B y"], "continuation": "z.", "gold": 0}]
    assert rendered(task("schema", data), 0) == ["A x z.", "B y z."]


def test_language_modeling_prompts_trim_contexts_and_strip_the_one_without_continuation():
    data = [{"context": " one two  ", "continuation": "three"}, {"context": "four ", "continuation": "five"}]
    assert rendered(task("language_modeling", data, 1), 0) == ["four five\n\none two", "four five\n\none two three"]


def test_spans_start_after_the_common_prefix_or_at_the_common_suffix(llm):
    tokenizer = llm.tokenizer
    mc = task("multiple_choice", [{"query": "Q", "choices": ["sun", "sky"], "gold": 0}])
    assert [(p.token_ids, p.start) for p in scored_prompts(mc, 0, tokenizer, 63)] == \
        [(tokenizer.encode("Q sun"), 4), (tokenizer.encode("Q sky"), 4)]   # BOS, "Q", " ", "s"
    schema = task("schema", [{"context_options": ["ab", "cb"], "continuation": "d", "gold": 0}])
    assert [p.start for p in scored_prompts(schema, 0, tokenizer, 63)] == [2, 2]   # "b d" is shared
    lm = task("language_modeling", [{"context": "ab", "continuation": "cd"}])
    assert [(p.token_ids, p.start) for p in scored_prompts(lm, 0, tokenizer, 63)] == \
        [(tokenizer.encode("ab cd"), 3)]


def test_long_prompts_keep_their_last_tokens_and_shift_the_span(llm):
    lm = task("language_modeling", [{"context": "x" * 20, "continuation": "yz"}])
    (prompt,) = scored_prompts(lm, 0, llm.tokenizer, 10)
    assert prompt.token_ids == llm.tokenizer.encode("x" * 20 + " yz")[-10:]
    assert prompt.start == 7


def test_a_continuation_longer_than_a_prompt_may_be_is_refused(llm):
    lm = task("language_modeling", [{"context": "x", "continuation": "y" * 20}])
    with pytest.raises(ValueError, match="do not fit in the 10 tokens"):
        scored_prompts(lm, 0, llm.tokenizer, 10)


# -- verdicts ------------------------------------------------------------------------------

def reference_scores(checkpoint_dir, prompts) -> list[tuple[float, bool]]:
    """(mean loss over the continuation, every continuation token the argmax) per prompt,
    from the full-recompute reference, with nanochat's shifted cross-entropy."""
    sd, cfg = load_reference(checkpoint_dir)
    scores = []
    for p in prompts:
        tokens = torch.tensor(p.token_ids)
        logits = reference_logits(sd, cfg, "E", p.token_ids)
        losses = F.cross_entropy(logits, torch.roll(tokens, -1), reduction="none")
        span = slice(p.start - 1, len(tokens) - 1)   # position i predicts token i + 1
        scores.append((losses[span].mean().item(),
                       bool(torch.all(logits.argmax(-1)[span] == tokens[p.start:]))))
    return scores


def test_mean_losses_and_argmax_matches_equal_the_full_recompute_reference(llm, bundle, checkpoint_dir):
    tasks = read_bundle(bundle)
    prompts = [p for t in tasks for i in range(len(t.data)) for p in scored_prompts(t, i, llm.tokenizer, 63)]
    assert any(p.token_ids[0] != llm.tokenizer.bos_id for p in prompts), "some prompt should be cropped"
    outputs = llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts],
                           [scoring_params(p.start) for p in prompts], use_tqdm=False)
    for p, out, (want_loss, want_argmax) in zip(prompts, outputs, reference_scores(checkpoint_dir, prompts)):
        logprobs = continuation_logprobs(p, out)
        assert mean_loss(logprobs) == pytest.approx(want_loss, rel=1e-5)
        assert all(lp.rank == 1 for lp in logprobs) == want_argmax


def test_verdicts_equal_the_reference_choices(llm, bundle, checkpoint_dir):
    tasks = read_bundle(bundle)
    want = []
    for t in tasks:
        verdicts = []
        for i, item in enumerate(t.data):
            scores = reference_scores(checkpoint_dir, scored_prompts(t, i, llm.tokenizer, 63))
            if t.task_type == "language_modeling":
                verdicts.append(scores[0][1])
            else:
                losses = [loss for loss, _ in scores]
                verdicts.append(losses.index(min(losses)) == item["gold"])
        want.append(verdicts)
    got = evaluate_tasks(llm, tasks)
    assert got == want
    assert all(any(v) and not all(v) for v in got), got   # a mix in every task, so the check can fail


def test_evaluate_core_centers_accuracies_on_the_random_baselines(llm, bundle):
    verdicts = evaluate_tasks(llm, read_bundle(bundle))
    out = evaluate_core(llm, bundle, use_tqdm=False)
    accuracies = {label: sum(v) / len(v) for (label, *_), v in zip(TASKS, verdicts)}
    assert out["results"] == pytest.approx(accuracies)
    centered = {label: (a - RANDOM_BASELINES[label] / 100) / (1 - RANDOM_BASELINES[label] / 100)
                for label, a in accuracies.items()}
    assert out["centered_results"] == pytest.approx(centered)
    assert out["core_metric"] == pytest.approx(sum(centered.values()) / 3)


def test_every_prompt_of_every_task_goes_to_one_generate_call(llm, bundle, monkeypatch):
    calls = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda prompts, *args, **kwargs: calls.append(len(prompts))
                        or generate(prompts, *args, **kwargs))
    evaluate_core(llm, bundle, use_tqdm=False)
    tasks = read_bundle(bundle)
    assert calls == [sum(len(scored_prompts(t, i, llm.tokenizer, 63)) for t in tasks for i in range(len(t.data)))]


def test_the_choices_of_an_example_compute_their_shared_context_once(checkpoint_dir, bundle, monkeypatch):
    llm = LLM(checkpoint_dir, block_size=16)
    outputs = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda *args, **kwargs: outputs.extend(generate(*args, **kwargs))
                        or outputs)
    (mc,) = [t for t in read_bundle(bundle) if t.task_type == "multiple_choice"]
    evaluate_tasks(llm, [mc])
    block_size = llm.engine.block_size
    choices = iter(outputs)
    for i in range(len(mc.data)):
        first, *others = [(p, next(choices)) for p in scored_prompts(mc, i, llm.tokenizer, 63)]
        # full blocks before the continuation are the context; the first choice computes them
        context_blocks = (first[0].start - 1) // block_size
        assert context_blocks >= 1
        assert all(out.num_cached_tokens >= context_blocks * block_size for _, out in others)


def test_command_prints_each_task_and_core(checkpoint_dir, bundle, capsys):
    out = main(["--model", str(checkpoint_dir), "--bundle", str(bundle), "--max-per-task", "4",
                "--dtype", "float32"])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["Task", "mc", "schema", "lm", "CORE"]
    assert float(printed[-1].split()[-1]) == pytest.approx(out["core_metric"], abs=1e-6)


def test_command_refuses_a_bad_bundle_before_loading_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "no-model"), "--bundle", str(tmp_path)])
    assert "core.yaml not found" in capsys.readouterr().err


# -- nanochat's own ------------------------------------------------------------------------

def test_verdicts_and_accuracies_equal_nanochats_core_eval(llm, bundle, checkpoint_dir):
    """Needs NANOCHAT_SRC: a nanochat checkout whose dependencies import here."""
    theirs = nanochat_engine_or_skip(checkpoint_dir)
    from nanochat import core_eval
    # nanochat crops to a model's max_seq_len where it has one: ours, so both crop alike
    theirs.model.max_seq_len = llm.engine.max_model_len - 1
    tasks = read_bundle(bundle)
    out = evaluate_core(llm, bundle, use_tqdm=False)
    for t, got in zip(tasks, evaluate_tasks(llm, tasks)):
        meta = {"task_type": t.task_type, "num_fewshot": t.num_fewshot,
                "continuation_delimiter": t.continuation_delimiter}
        want = [core_eval.evaluate_example(i, theirs.model, theirs.tokenizer, t.data, "cpu", meta)
                for i in range(len(t.data))]
        assert got == want, t.label
        assert out["results"][t.label] == core_eval.evaluate_task(theirs.model, theirs.tokenizer, t.data, "cpu", meta)
        assert not math.isnan(out["centered_results"][t.label])
