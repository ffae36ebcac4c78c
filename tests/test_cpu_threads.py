"""CPU engines pick a thread count that survives a busy machine, and respect explicit ones."""

import pytest
import torch

from microvllm import LLM
from microvllm.cpu import threads as cpu_threads
from microvllm.serve.engine_process import EngineThreads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pick(monkeypatch, cores, load, runnable):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(cpu_threads, "runnable_elsewhere", lambda: runnable)
    cpu_threads.default_cpu_threads.cache_clear()
    try:
        return cpu_threads.default_cpu_threads()
    finally:
        cpu_threads.default_cpu_threads.cache_clear()


def test_default_takes_the_cores_that_others_do_not_keep_busy(monkeypatch):
    assert pick(monkeypatch, cores=16, load=0.1, runnable=0) == 16
    assert pick(monkeypatch, cores=2, load=0.2, runnable=0) == 2     # a quiet two-core machine
    assert pick(monkeypatch, cores=16, load=10.2, runnable=12) == 6
    assert pick(monkeypatch, cores=2, load=1.0, runnable=1) == 1     # a busy neighbour on two cores
    assert pick(monkeypatch, cores=1, load=0.0, runnable=0) == 1
    assert pick(monkeypatch, cores=4, load=30.0, runnable=29) == 1


def test_a_job_that_just_ended_or_a_passing_task_does_not_count_as_a_busy_core(monkeypatch):
    assert pick(monkeypatch, cores=2, load=1.1, runnable=0) == 2     # still in the 1-minute average
    assert pick(monkeypatch, cores=2, load=0.1, runnable=1) == 2     # runnable for a moment
    assert pick(monkeypatch, cores=2, load=1.0, runnable=None) == 1  # no /proc: the average alone


def test_tasks_runnable_elsewhere_are_read_from_proc_on_linux():
    assert cpu_threads.runnable_elsewhere() in range(0, 1024)


def test_explicit_cpu_threads_is_applied_when_the_engine_is_built(checkpoint_dir, restore_threads):
    LLM(checkpoint_dir, cpu_threads=2)
    assert torch.get_num_threads() == 2


def test_omp_num_threads_set_by_the_user_is_not_overridden(checkpoint_dir, monkeypatch, restore_threads):
    torch.set_num_threads(3)  # as torch does at import for OMP_NUM_THREADS=3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    LLM(checkpoint_dir)
    assert torch.get_num_threads() == 3


def test_default_applies_without_omp_num_threads(checkpoint_dir, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "default_cpu_threads", lambda: 1)
    torch.set_num_threads(2)
    LLM(checkpoint_dir)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_cpu_threads_is_refused(checkpoint_dir, value, error):
    with pytest.raises(error, match="cpu_threads"):
        LLM(checkpoint_dir, cpu_threads=value)


def test_the_servers_engine_leaves_a_core_to_http_only_while_a_stream_is_open(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[-1] if calls else 2)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    threads = EngineThreads(threads=2, stream_threads=1)
    threads.apply(streaming=False)
    assert calls == []
    threads.apply(streaming=True)
    threads.apply(streaming=True)
    threads.apply(streaming=False)
    assert calls == [1, 2]
    EngineThreads(threads=2).apply(streaming=True)  # an explicit count stays
    assert calls == [1, 2]
