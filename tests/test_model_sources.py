"""Where `LLM(model=...)` finds a model: local dirs, nanochat's output tree, the hub cache.

Everything is built locally: a nanochat base dir under tmp, and a Hugging Face cache
laid out as the hub library lays it out (models--org--name/refs, snapshots/<commit>).
No test reaches the network: HF_HUB_OFFLINE=1 unless a test fakes the download itself.
"""

import shutil
import sys

import pytest

from checkpoints import write_checkpoint
from microvllm import LLM, SamplingParams
from microvllm.model.sources import resolve_model_dir

GREEDY = SamplingParams(temperature=0, max_tokens=8)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tokens(model, **kwargs):
    llm = LLM(model, device="cpu", dtype="float32", kv_cache_memory=2**22, **kwargs)
    return llm.generate("To be", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A nanochat output tree: base d4, sft d4 and d12 (another seed), the tokenizer at the top."""
    base = tmp_path / "nanochat"
    for phase, tag, seed in [("base_checkpoints", "d4", 0), ("chatsft_checkpoints", "d4", 1),
                             ("chatsft_checkpoints", "d12", 2)]:
        write_checkpoint(base / phase / tag, seed=seed, tokenizer=False)
    write_checkpoint(tmp_path / "tok", tokenizer=True)
    shutil.copytree(tmp_path / "tok" / "tokenizer", base / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def test_source_and_tag_name_a_nanochat_checkpoint(base_dir):
    assert tokens("sft:d4") == tokens(base_dir / "chatsft_checkpoints" / "d4")
    assert tokens("base:d4") != tokens("sft:d4")


def test_source_without_tag_takes_the_deepest_model(base_dir):
    assert resolve_model_dir("sft") == base_dir / "chatsft_checkpoints" / "d12"
    assert resolve_model_dir("base") == base_dir / "base_checkpoints" / "d4"


def test_default_base_dir_is_the_nanochat_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    write_checkpoint(tmp_path / ".cache" / "nanochat" / "chatrl_checkpoints" / "d4")
    assert resolve_model_dir("rl:d4") == tmp_path / ".cache" / "nanochat" / "chatrl_checkpoints" / "d4"


def test_unknown_tag_lists_the_tags_there(base_dir):
    with pytest.raises(FileNotFoundError, match=r"'sft:d9'.*chatsft_checkpoints/d9; model tags there: \['d12', 'd4'\]"):
        resolve_model_dir("sft:d9")
    with pytest.raises(FileNotFoundError, match="rl.*model tags there: none"):
        resolve_model_dir("rl")


def test_a_local_dir_wins_over_the_other_forms(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "sft")
    assert resolve_model_dir("sft").resolve() == tmp_path / "sft"


def test_dir_with_another_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama', not 'nanochat'"):
        LLM(tmp_path)


def test_dir_with_neither_format_lists_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"looked for nanochat's model_<step>.pt \+ meta_<step>.json, "
                                                r"and for the transformers format's config.json"):
        LLM(tmp_path)


def test_a_file_is_not_a_model_dir(checkpoint_dir):
    with pytest.raises(ValueError, match="is a file; give the directory that holds it"):
        LLM(checkpoint_dir / "model_000100.pt")


# -- the Hugging Face hub ----------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that the hub library uses, with downloads off."""
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache, repo_id, commit=COMMIT, ref="main"):
    """The snapshot dir of `repo_id` at `commit`, which `ref` points at, as the hub library lays it out."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def native_snapshot(snapshot, seed=0):
    """nanochat's own files as published: the tokenizer beside the weights."""
    write_checkpoint(snapshot, seed=seed)
    shutil.move(snapshot / "tokenizer" / "tokenizer.pkl", snapshot / "tokenizer.pkl")
    (snapshot / "tokenizer").rmdir()
    return snapshot


def test_hub_id_loads_from_the_cache_offline(hub_cache, checkpoint_dir):
    native_snapshot(cache_repo(hub_cache, "karpathy/nanochat-d4"))
    assert tokens("karpathy/nanochat-d4") == tokens(checkpoint_dir)


def test_hub_id_in_the_transformers_format(hub_cache):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from microvllm.convert import nanochat_to_transformers
    native = write_checkpoint(hub_cache.parent / "native", era="A", window_pattern=None)
    nanochat_to_transformers(native, cache_repo(hub_cache, "someone/nanochat-hf"))
    assert tokens("someone/nanochat-hf") == tokens(native)


def test_hub_revision_picks_its_snapshot(hub_cache):
    native_snapshot(cache_repo(hub_cache, "org/model"), seed=0)
    other = "f" * 40
    native_snapshot(cache_repo(hub_cache, "org/model", commit=other, ref="v2"), seed=5)
    assert resolve_model_dir("org/model", revision="v2").name == other
    assert resolve_model_dir("org/model").name == COMMIT


def test_uncached_hub_id_offline_says_how_to_fetch_it(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"'org/missing' is not a local dir.*not in the Hugging Face cache"
                                                r".*HF_HUB_OFFLINE=1.*hf download org/missing"):
        LLM("org/missing")


def fake_downloads(monkeypatch, on_download):
    """Record snapshot_download calls; a call that may download runs `on_download` instead."""
    import huggingface_hub
    real, calls = huggingface_hub.snapshot_download, []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        return str(on_download(repo_id))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return calls


def test_cached_hub_id_never_asks_the_hub(hub_cache, monkeypatch):
    native_snapshot(cache_repo(hub_cache, "org/model"))
    calls = fake_downloads(monkeypatch, lambda repo_id: pytest.fail("the cache held it"))
    assert resolve_model_dir("org/model").name == COMMIT
    assert calls == [True]


def test_uncached_hub_id_downloads_when_allowed(hub_cache, monkeypatch):
    calls = fake_downloads(monkeypatch, lambda repo_id: native_snapshot(cache_repo(hub_cache, repo_id)))
    assert resolve_model_dir("org/fresh", step=100).name == COMMIT
    assert calls == [True, False]


def test_failed_download_names_the_id(hub_cache, monkeypatch):
    def refuse(repo_id):
        raise OSError("no route to host")
    fake_downloads(monkeypatch, refuse)
    with pytest.raises(FileNotFoundError, match="downloading the hub repo org/gone failed: OSError: no route"):
        resolve_model_dir("org/gone")


def test_missing_path_lists_the_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"b does not exist \(nor does .*a\); model takes a local "
                                                r"checkpoint dir, a nanochat SOURCE\[:TAG\]"):
        LLM(str(tmp_path / "a" / "b"))


@pytest.mark.parametrize("name", ["models/shakespeare-d5", "./shakespeare-d4"])
def test_a_mistyped_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    # vLLM habit: a relative path; ORG/NAME-shaped, but models/ is here and hub names start with no dot
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "models" / "shakespeare-d4")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # would say "pip install" if asked
    with pytest.raises(FileNotFoundError, match=rf"model: {name} does not exist \(.* holds: "):
        LLM(name)
    with pytest.raises(FileNotFoundError, match=r"models holds: shakespeare-d4; did you mean 'models/shakespeare-d4'"):
        resolve_model_dir("models/shakespeare-d5")


def test_run_py_takes_the_same_forms(base_dir, capsys):
    import run
    run.main(["--model", "sft:d4", "--prompt", "To be", "--max-tokens", "4", "--device", "cpu"])
    assert "requests 1 | prompt tokens 6 | generated tokens 4 |" in capsys.readouterr().out


def test_hub_id_without_the_hf_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when not installed
    with pytest.raises(ImportError, match=r'needs huggingface_hub: pip install -e "\.\[hf\]"'):
        resolve_model_dir("org/model")


def test_a_dir_with_both_formats_reads_safetensors_unless_a_step_is_asked(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from microvllm.convert import nanochat_to_transformers
    from microvllm.model.sources import detect_format
    both = write_checkpoint(tmp_path / "both", era="A", window_pattern=None)
    nanochat_to_transformers(both, both)
    assert detect_format(both) == "transformers"
    assert detect_format(both, step=100) == "nanochat"
