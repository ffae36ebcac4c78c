"""`python -m microvllm.serve`, as a new user meets it: --help says what every flag does and
what leaving it out means (no bare "default: None"), the start-up log says what is served
and how, and /metrics counts the KV blocks from the start."""

import logging

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


@pytest.fixture(scope="module")
def started(checkpoint_dir):
    """The app `python -m microvllm.serve --dtype half` builds, and the records it logged while starting."""
    from microvllm.serve import cli
    apps, records = [], []
    handler = logging.Handler()
    handler.emit = records.append
    package = logging.getLogger("microvllm")
    package.addHandler(handler)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(package, "level", logging.INFO)
        patch.setattr(cli.uvicorn, "run", lambda app, **settings: apps.append(app))
        patch.setenv("OMP_NUM_THREADS", "1")  # the engine's threads come from it, and are logged too
        cli.main([str(checkpoint_dir), "--device", "cpu", "--dtype", "half", "--num-blocks", "40",
                  "--block-size", "16"])
    package.removeHandler(handler)
    return apps[0], records


def test_the_start_up_log_names_the_model_dtype_device_threads_and_kv_cache(started, checkpoint_dir):
    logged = "\n".join(r.getMessage() for r in started[1])
    assert f"loaded {checkpoint_dir}" in logged and "CPU threads: 1" in logged
    assert f"{checkpoint_dir}: bfloat16 on cpu; KV cache: 40 blocks of 16 tokens (640 tokens" in logged


def test_the_engine_process_start_up_warnings_reach_the_server_log_once(started):
    assert [r.name for r in started[1] if "float16 is not supported on CPU" in r.getMessage()] \
        == ["microvllm.platform.cpu"]


def test_metrics_count_every_kv_block_before_the_first_request(started):
    from fastapi.testclient import TestClient
    with TestClient(started[0]) as client:
        text = client.get("/metrics").text
    assert "microvllm_kv_cache_blocks_total 40\n" in text and "microvllm_kv_cache_blocks_used 0\n" in text
