"""Without Ray, data_parallel_size > 1 names the install command; one engine needs no Ray."""

import sys

import pytest

from microvllm import LLM


def test_data_parallel_without_ray_names_the_extra(monkeypatch, checkpoint_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    for name in [m for m in sys.modules if m.startswith("microvllm.distributed")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[distributed\]"'):
        LLM(checkpoint_dir, data_parallel_size=2)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_data_parallel_size_must_be_a_positive_int(checkpoint_dir, bad, error):
    with pytest.raises(error, match="data_parallel_size"):
        LLM(checkpoint_dir, data_parallel_size=bad)
