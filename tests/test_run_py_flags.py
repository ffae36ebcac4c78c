"""run.py's flags, read from its parser in this process (no subprocess): they take what
LLM takes and their help says what the program does."""

import pytest
import run
import torch

from microvllm import LLM
from microvllm.engine.config import DTYPE_ALIASES, DTYPES


def help_of(flag: str) -> str:
    action = next(a for a in run.build_parser()._actions if flag in a.option_strings)
    return " ".join(action.help.split())


@pytest.mark.parametrize("name", ["auto", *DTYPES, *DTYPE_ALIASES])
def test_dtype_takes_every_name_llm_takes(name):
    assert run.build_parser().parse_args(["--dtype", name]).dtype == name


def test_dtype_half_runs_as_llm_runs_it_on_cpu(checkpoint_dir):
    args = run.build_parser().parse_args(["--dtype", "half"])
    assert LLM(checkpoint_dir, dtype=args.dtype, num_blocks=8).engine.dtype is torch.bfloat16
    assert "float16 (half) runs as bfloat16 on a CPU" in help_of("--dtype")


def test_cpu_threads_help_states_the_default_the_engine_uses():
    # cpu/threads.py's default: usable cores less those kept busy by others, at least one
    assert "less one" not in help_of("--cpu-threads")
    assert "the cores this process may use less those other processes keep busy, at least one" \
        in help_of("--cpu-threads")
