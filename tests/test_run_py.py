"""run.py, the command-line front end, driven as a user would: through a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test starts a Python subprocess

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    # one thread: the model is tiny, and a second thread only helps on an idle machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)


def test_default_run_prints_completions_and_summary():
    result = run("--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== prompt ") == 4
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("requests 4 | prompt tokens ") and summary.endswith(" tokens/s")


def test_one_greedy_prompt():
    result = run("--prompt", "ROMEO.\\n", "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "=== prompt 1/1: 'ROMEO.\\n'" in result.stdout
    assert "\nROMEO.\n" in result.stdout
    assert "requests 1 | prompt tokens 6 | generated tokens 5 |" in result.stdout


def test_n_completions_per_prompt():
    result = run("--prompt", "JULIET.\\n", "--n", "2", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "--- completion 1/2" in result.stdout and "--- completion 2/2" in result.stdout
    assert "generated tokens 8 |" in result.stdout


def test_prompts_file_in_chat_format(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who art thou?\n\nSpeak, friend.\n")
    result = run("--prompts-file", str(prompts), "--chat", "--max-tokens", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "=== prompt 2/2: 'Speak, friend.'" in result.stdout
    assert "requests 2 |" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature must be"),
    (["--top-p", "2"], "top_p must be"),
    (["--max-tokens", "0"], "max_tokens must be"),
    (["--n", "two"], "invalid int value"),
    (["--dtype", "int8"], "invalid choice"),
    (["--prompt", "a", "--prompts-file", "b.txt"], "not allowed with"),
])
def test_bad_flag_values_exit_2_with_one_line_message(args, message):
    result = run(*args)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("run.py: error:") and message in error
    assert "Traceback" not in result.stderr


def test_unknown_model_dir(tmp_path):
    result = run("--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "no-such-model does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_mistyped_relative_model_dir_lists_what_is_there():
    result = run("--model", "models/shakespeare-d5")
    assert result.returncode == 2
    assert "models/shakespeare-d5 does not exist" in result.stderr
    assert "did you mean 'models/shakespeare-d4'" in result.stderr
    assert "pip install" not in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_meta_value_of_the_wrong_type_exits_2_with_one_line_message(tmp_path):
    bundled = REPO / "models" / "shakespeare-d4"
    meta = json.loads((bundled / "meta_001500.json").read_text())
    meta["model_config"]["n_layer"] = "4"  # validation raises TypeError for a str
    (tmp_path / "meta_001500.json").write_text(json.dumps(meta))
    (tmp_path / "model_001500.pt").symlink_to(bundled / "model_001500.pt")
    (tmp_path / "tokenizer").symlink_to(bundled / "tokenizer")
    result = run("--model", str(tmp_path))
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("run.py: error:") and "model_config.n_layer must be an int" in error
    assert "Traceback" not in result.stderr


def test_help_explains_where_to_get_checkpoints():
    result = run("--help")
    assert result.returncode == 0
    assert "karpathy/nanochat" in result.stdout and "~/.cache/nanochat/tokenizer" in result.stdout


def test_chat_on_a_base_model_says_so():
    result = run("--chat", "--prompt", "Hello", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "warning: --chat on a base model" in result.stderr


def test_cpu_threads_flag():
    assert run("--cpu-threads", "1", "--max-tokens", "2").returncode == 0
    result = run("--cpu-threads", "0")
    assert result.returncode == 2 and "--cpu-threads must be >= 1" in result.stderr
