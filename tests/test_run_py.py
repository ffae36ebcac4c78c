"""run.py, the command-line front end: the README's command through a subprocess, as a
user runs it; its other behaviours through its main() in this process (the same code
path after the interpreter starts, without paying for a new one per test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import run as run_py
import torch

from microvllm import LLM
from microvllm.engine.config import DTYPE_ALIASES, DTYPES

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    # one thread: the model is tiny, and a second thread only helps on an idle machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)


@pytest.fixture
def main(capsys, monkeypatch):
    """run.py's main(argv) here, from the repository root: (exit code, stdout, stderr)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [str(REPO / "run.py")])  # argparse names the program after it

    def call(*args: str) -> tuple[int, str, str]:
        try:
            run_py.main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return call


def help_of(flag: str) -> str:
    action = next(a for a in run_py.build_parser()._actions if flag in a.option_strings)
    return " ".join(action.help.split())


@pytest.mark.slow  # a Python subprocess
def test_default_run_prints_completions_and_summary():
    result = run("--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== prompt ") == 4
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("requests 4 | prompt tokens ") and summary.endswith(" tokens/s")


def test_one_greedy_prompt(main):
    code, out, err = main("--prompt", "ROMEO.\\n", "--max-tokens", "5", "--temperature", "0")
    assert code == 0, err
    assert "=== prompt 1/1: 'ROMEO.\\n'" in out
    assert "\nROMEO.\n" in out
    assert "requests 1 | prompt tokens 6 | generated tokens 5 |" in out


def test_n_completions_per_prompt(main):
    code, out, err = main("--prompt", "JULIET.\\n", "--n", "2", "--max-tokens", "4")
    assert code == 0, err
    assert "--- completion 1/2" in out and "--- completion 2/2" in out
    assert "generated tokens 8 |" in out


def test_prompts_file_in_chat_format(main, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who art thou?\n\nSpeak, friend.\n")
    code, out, err = main("--prompts-file", str(prompts), "--chat", "--max-tokens", "3", "--seed", "1")
    assert code == 0, err
    assert "=== prompt 2/2: 'Speak, friend.'" in out
    assert "requests 2 |" in out


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature must be"),
    (["--top-p", "2"], "top_p must be"),
    (["--max-tokens", "0"], "max_tokens must be"),
    (["--n", "two"], "invalid int value"),
    (["--dtype", "int8"], "invalid choice"),
    (["--prompt", "a", "--prompts-file", "b.txt"], "not allowed with"),
])
def test_bad_flag_values_exit_2_with_one_line_message(main, args, message):
    code, _, err = main(*args)  # any exception but SystemExit would fail the test with its traceback
    assert code == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("run.py: error:") and message in error


def test_unknown_model_dir(main, tmp_path):
    code, _, err = main("--model", str(tmp_path / "no-such-model"))
    assert code == 2
    assert "no-such-model does not exist" in err


def test_mistyped_relative_model_dir_lists_what_is_there(main):
    code, _, err = main("--model", "models/shakespeare-d5")
    assert code == 2
    assert "models/shakespeare-d5 does not exist" in err
    assert "did you mean 'models/shakespeare-d4'" in err
    assert "pip install" not in err


def test_checkpoint_meta_value_of_the_wrong_type_exits_2_with_one_line_message(main, tmp_path):
    bundled = REPO / "models" / "shakespeare-d4"
    meta = json.loads((bundled / "meta_001500.json").read_text())
    meta["model_config"]["n_layer"] = "4"  # validation raises TypeError for a str
    (tmp_path / "meta_001500.json").write_text(json.dumps(meta))
    (tmp_path / "model_001500.pt").symlink_to(bundled / "model_001500.pt")
    (tmp_path / "tokenizer").symlink_to(bundled / "tokenizer")
    code, _, err = main("--model", str(tmp_path))
    assert code == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("run.py: error:") and "model_config.n_layer must be an int" in error


@pytest.mark.slow  # a Python subprocess
def test_help_explains_where_to_get_checkpoints():
    result = run("--help")
    assert result.returncode == 0
    assert "karpathy/nanochat" in result.stdout and "~/.cache/nanochat/tokenizer" in result.stdout


def test_chat_on_a_base_model_says_so(main):
    code, _, err = main("--chat", "--prompt", "Hello", "--max-tokens", "2")
    assert code == 0, err
    assert "warning: --chat on a base model" in err


def test_cpu_threads_flag(main):
    threads = torch.get_num_threads()
    assert main("--cpu-threads", "1", "--max-tokens", "2")[0] == 0
    torch.set_num_threads(threads)  # the flag sets this process's count
    code, _, err = main("--cpu-threads", "0")
    assert code == 2 and "--cpu-threads must be >= 1" in err


@pytest.mark.parametrize("name", ["auto", *DTYPES, *DTYPE_ALIASES])
def test_dtype_takes_every_name_llm_takes(name):
    assert run_py.build_parser().parse_args(["--dtype", name]).dtype == name


def test_dtype_half_runs_as_llm_runs_it_on_cpu(checkpoint_dir):
    args = run_py.build_parser().parse_args(["--dtype", "half"])
    assert LLM(checkpoint_dir, dtype=args.dtype, num_blocks=8).engine.dtype is torch.bfloat16
    assert "float16 (half) runs as bfloat16 on a CPU" in help_of("--dtype")


def test_cpu_threads_help_states_the_default_the_engine_uses():
    # cpu/threads.py's default: usable cores less those kept busy by others, at least one
    assert "less one" not in help_of("--cpu-threads")
    assert "the cores this process may use less those other processes keep busy, at least one" \
        in help_of("--cpu-threads")


def test_speculative_config_leaves_greedy_completions_as_they_were(main):
    args = ("--prompt", "ROMEO.\\nI am", "--max-tokens", "24", "--temperature", "0")
    plain = main(*args)
    speculative = main(*args, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}')
    assert plain[0] == speculative[0] == 0
    assert plain[1].split("requests 1 |")[0] == speculative[1].split("requests 1 |")[0]


@pytest.mark.parametrize("value, message", [("{bad", "not valid JSON"), ("[1]", "must be a JSON object"),
                                            ('{"method": "eagle"}', "speculative_config")])
def test_a_bad_speculative_config_is_refused_by_name(main, value, message):
    code, _, err = main("--speculative-config", value)
    assert code == 2 and message in err
