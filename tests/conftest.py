import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# the tests' helpers, and the repository root for `benchmarks` and test_alpaca.py
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """An era-E checkpoint (sequence_len 64, windows "SL") with its tokenizer beside it."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "d4")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    def make(**kwargs):
        return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", **kwargs)
    return make
