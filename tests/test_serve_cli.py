"""`python -m microvllm.serve --help` says what every flag does and what leaving it out
means: no flag without help, no bare "default: None"."""

import pytest

pytest.importorskip("uvicorn")
from microvllm.serve.cli import build_parser  # noqa: E402

FLAGS = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("action", FLAGS, ids=[a.option_strings[0] for a in FLAGS])
def test_every_flag_says_what_it_does(action):
    assert action.help and "None" not in action.help


@pytest.mark.parametrize("flag, says", [
    ("--dtype", "default: bfloat16 on cuda and on CPUs with bfloat16 instructions, float32 on other CPUs"),
    ("--device", "default: cuda if available, else cpu"),
    ("--block-size", "default: the attention backend's"),
    ("--max-model-len", "default: the model's sequence_len"),
])
def test_engine_flags_whose_default_is_none_say_what_none_means(flag, says):
    action = next(a for a in FLAGS if flag in a.option_strings)
    assert action.default is None and says in " ".join(action.help.split())
