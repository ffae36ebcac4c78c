"""How many threads torch's CPU kernels get, chosen once when a CPU engine is built.

torch's own default is one thread per core of the machine. That is the fastest choice
on an idle machine and a disastrous one on a busy machine: the kernels of a small model
are short, and each one waits for its slowest thread, so a single thread descheduled by
a neighbour stalls every matmul (tens of times slower on two shared cores). The default
here is the number of cores this process may actually run on (its CPU affinity and any
cgroup CPU quota) minus the cores other processes keep busy, and never less than one.
The engine's Python host loop needs no core of its own: it runs in the thread that
launches the kernels, between them. (The server's HTTP process does need one; the
server leaves it.)

A core counts as kept busy by others when the 1-minute load average says so and tasks of
other processes are runnable now: the average alone still counts a job that ended a
minute ago, and a task runnable at this instant may be a blip.

An explicit choice always wins: `cpu_threads=` first, then an `OMP_NUM_THREADS` the
user set (torch already read it at import), then the default. The setting is
process-wide (torch has one intra-op pool), so the last CPU engine built decides it.
"""

import functools
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is all we know
    return cores


@functools.cache  # once per process: later, the load average counts our own threads too
def default_cpu_threads() -> int:
    return max(1, usable_cores() - busy_cores_elsewhere())


def busy_cores_elsewhere() -> int:
    """Cores other processes keep busy: the fewer of the 1-minute load average (rounded)
    and the tasks of other processes runnable now, where that is known."""
    try:
        average = round(os.getloadavg()[0])
    except OSError:
        return 0
    now = runnable_elsewhere()
    return average if now is None else min(average, now)


def runnable_elsewhere() -> int | None:
    """Tasks of other processes runnable at this instant (Linux's /proc), or None."""
    try:
        runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        ours = sum(Path(f"/proc/self/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
                   for task in os.listdir("/proc/self/task"))
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - ours)


def apply_cpu_threads(cpu_threads: int | None) -> int:
    """Set torch's intra-op thread count for a CPU engine; returns the count in force."""
    if cpu_threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user's OMP_NUM_THREADS, as torch read it
    threads = default_cpu_threads() if cpu_threads is None else cpu_threads
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    logger.info(f"CPU threads: {threads}")
    return threads
