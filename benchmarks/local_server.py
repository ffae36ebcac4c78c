"""An OpenAI-compatible server started as a child process on a free loopback port, and
the CPU time its threads spend: what the serving benchmarks need of any server.

Both microvllm's server and vLLM's answer GET /health once their engine is up, so one
launcher serves both; each benchmark builds its own command line.
"""

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, cwd: Path, env: dict | None = None, log_file: Path | None = None,
          timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """Start `command` (a server that listens on `port`) and wait for its /health; its output
    goes to `log_file` where one is given. Raises if it exits or stays silent past timeout_s."""
    log = open(log_file, "w") if log_file else None
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited (code {server.returncode}) before it answered /health"
                               + (f"; its log: {log_file}" if log_file else ""))
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise TimeoutError(f"the server did not answer /health within {timeout_s:.0f} s")


@contextlib.contextmanager
def running(command: list[str], port: int, cwd: Path, env: dict | None = None, log_file: Path | None = None,
            timeout_s: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """`start`, then stop the server (SIGTERM, then SIGKILL after 60 s) however the block ends."""
    server, url = start(command, port, cwd, env, log_file, timeout_s)
    try:
        yield server, url
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def cpu_seconds(stat_file: str | Path) -> float:
    """User and system CPU seconds from a /proc stat file, of a process or of one thread (Linux)."""
    fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of process `pid` and of its descendants, by (pid, thread id)."""
    seconds, pending = {}, [pid]
    while pending:
        process = pending.pop()
        for task in Path(f"/proc/{process}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                seconds[process, int(task.name)] = cpu_seconds(task / "stat")
                pending += [int(child) for child in (task / "children").read_text().split()]
    return seconds


def busy_threads(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float], wall_s: float,
                 share: float = 0.25) -> int:
    """Threads that ran at least `share` of `wall_s` between the two snapshots: the threads an
    engine really computes on, whatever it was told, spinning OpenMP workers included."""
    return sum(s - before.get(key, 0.0) >= share * wall_s for key, s in after.items())
