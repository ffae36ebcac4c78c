"""EngineProcess: the LLM in a process of its own, stepping while it has work.

The server's event loop and the engine both run Python. In one process they would take
turns on the GIL, so every chunk the server streams would lengthen the engine's step;
in two they run side by side. The server sends lists of commands down one pipe
(add, abort, stop); every `stream_interval` steps (and whenever it runs out of work)
the engine sends back those steps' outputs, with its stats, down the other: a stream's
deltas of several steps then reach its client as one chunk, which saves the server a
chunk and a socket write per token. In the engine's process a reader thread drains the command
pipe as commands come, so the server never waits on a step to send; what it has read
joins the batch at the next step.
"""

import logging
import multiprocessing
import os
import queue
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import torch

from ..cpu.threads import default_cpu_threads
from ..engine.stats import EngineStats
from ..llm import LLM
from ..sampling_params import RequestOutputKind
from ..tokenizer import Tokenizer
from .wire import PackedOutput, packed

STOP_TIMEOUT_S = 30.0

# what the engine sends after a step: (request id, its output or the error that ended it)
# pairs, and the engine's stats then
StepResults = tuple[list[tuple[str, PackedOutput | Exception]], EngineStats]


class RequestRefused(Exception):
    """The engine would not take a request (a structured output it cannot compile, say):
    the caller's fault, told to the caller."""


@dataclass
class EngineInfo:
    """What the server needs to know of the engine to check requests before sending them."""
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    streams: bool    # one engine streams outputs; data-parallel replicas return finished ones only
    stats: EngineStats  # as loaded: the KV blocks in all, before any request
    # what the engine logged while loading (its dtype, device, threads, KV cache), for the
    # server to log as its own: this process's logging is not the server's
    startup_log: list[logging.LogRecord]


class EngineProcess:
    """The server's handle: starts the engine's process and waits until it is loaded
    (raising its error if it cannot load), then sends commands and receives results."""

    def __init__(self, llm_args: dict, stream_interval: int = 1):
        context = multiprocessing.get_context("spawn")  # a forked child would inherit torch's threads broken
        commands_out, self._commands = context.Pipe(duplex=False)
        self._results, results_in = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve_engine, name="microvllm-engine", daemon=True,
                                       args=(llm_args, stream_interval, commands_out, results_in))
        self.process.start()
        commands_out.close()  # the child's ends: closed here, so that either side sees the other go
        results_in.close()
        try:
            kind, payload = self._results.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"the engine process exited while loading (exit code "
                               f"{self.process.exitcode})") from None
        if kind == "failed":
            self.process.join()
            raise payload
        self.info: EngineInfo = payload

    def send(self, commands: list[tuple]) -> None:
        self._commands.send(commands)

    def receive(self) -> list[StepResults]:
        """The results of the steps since the last call, at least one step's (waiting for it);
        EOFError once the engine's process has gone."""
        results = [self._results.recv()]
        while self._results.poll():
            results.append(self._results.recv())
        return results

    def stop(self) -> None:
        try:
            self._commands.send([("stop",)])
        except OSError:
            pass  # gone already
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()

    @property
    def is_alive(self) -> bool:
        return self.process.is_alive()


def default_engine_threads() -> int:
    """The engine's CPU threads while a stream is open, where none are asked for: LLM's
    default less a core for the server's HTTP process, whose work for every streamed chunk
    would otherwise stall the kernels. With no stream open (scoring, whole completions) the
    HTTP process has little to do, and the engine takes LLM's default."""
    return max(1, default_cpu_threads() - 1)


@dataclass
class EngineThreads:
    """torch's threads for the engine's next step: `threads`, or `stream_threads` while a
    stream is open (None: `threads` always)."""
    threads: int
    stream_threads: int | None = None

    def apply(self, streaming: bool) -> None:
        wanted = self.stream_threads if streaming and self.stream_threads is not None else self.threads
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)


def _serve_engine(llm_args: dict, stream_interval: int, commands: Connection, results: Connection) -> None:
    # Ctrl-C reaches the whole process group; the server stops this process by a command
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stream_threads = None  # where the default applies: the engine's threads while a stream is open
    if llm_args.get("cpu_threads") is None and llm_args.get("data_parallel_size", 1) == 1:
        # named even where $OMP_NUM_THREADS sets it (as torch read it), so the engine logs it
        if os.environ.get("OMP_NUM_THREADS"):
            threads = torch.get_num_threads()
        else:
            threads, stream_threads = default_cpu_threads(), default_engine_threads()
        llm_args = {**llm_args, "cpu_threads": threads}
    try:
        with _startup_records() as startup_log:
            llm = LLM(**llm_args)
    except Exception as e:  # the server raises it as its own start-up error
        results.send(("failed", e))
        return
    results.send(("ready", EngineInfo(llm.tokenizer, llm.engine.max_model_len, llm.engine.vocab_size,
                                      llm.engine.streams, replace(llm.engine.stats), startup_log)))
    inbox = queue.SimpleQueue()
    threading.Thread(target=_read_commands, args=(commands, inbox), daemon=True).start()
    _EngineLoop(llm, inbox, results, stream_interval, stream_threads).run()


@contextmanager
def _startup_records():
    """The package's log records of INFO and above while the block runs, kept (and not
    printed here) with their messages formatted, so that they pickle."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)

    def keep(record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        records.append(record)
    handler.emit = keep
    package = logging.getLogger("microvllm")
    level, propagate = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield records
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        package.propagate = propagate


def _read_commands(commands: Connection, inbox: queue.SimpleQueue) -> None:
    while True:
        try:
            inbox.put(commands.recv())
        except (EOFError, OSError):  # the server has gone: stop with it
            inbox.put([("stop",)])
            return


class _EngineLoop:
    def __init__(self, llm: LLM, inbox: queue.SimpleQueue, results: Connection, stream_interval: int,
                 stream_threads: int | None = None):
        self.llm, self.inbox, self.results = llm, inbox, results
        self.stream_interval = stream_interval
        self.live: set[str] = set()  # requests added and not seen finish
        self.streams: set[str] = set()  # of those, the ones that stream
        self.started: set[str] = set()  # of those, the ones whose first output has gone out
        self.threads = EngineThreads(torch.get_num_threads(), stream_threads)

    def run(self) -> None:
        unsent, steps = [], 0
        while True:
            for command in self._take_commands(wait=not self.llm.has_unfinished_requests()):
                if command[0] == "stop":
                    return
                unsent += self._apply(command)
            if self.llm.has_unfinished_requests():
                unsent += self._step()
                steps += 1
            # sent before the loop can wait for commands, so nothing waits with it
            if steps >= self.stream_interval or not self.llm.has_unfinished_requests():
                self.results.send((unsent, replace(self.llm.engine.stats)))
                unsent, steps = [], 0

    def _take_commands(self, wait: bool) -> list[tuple]:
        batches = [self.inbox.get()] if wait else []
        while not self.inbox.empty():
            batches.append(self.inbox.get())
        return [command for batch in batches for command in batch]

    def _apply(self, command: tuple) -> list[tuple[str, Exception]]:
        if command[0] == "abort":
            for requests in (self.live, self.streams, self.started):
                requests.discard(command[1])
            self.llm.abort(command[1], keep_output=False)
            return []
        _, request_id, token_ids, params = command
        try:
            self.llm.add_request({"prompt_token_ids": token_ids}, params, request_id)
        except Exception as e:  # what the server could not check before (a grammar's compilation)
            return [(request_id, RequestRefused(str(e)))]
        self.live.add(request_id)
        if params.output_kind is RequestOutputKind.DELTA:
            self.streams.add(request_id)
        return []

    def _step(self) -> list[tuple[str, PackedOutput | Exception]]:
        self.threads.apply(streaming=bool(self.streams))
        try:
            outputs = self.llm.step()
        except Exception as e:
            # the engine is left as if the step had not run, but the requests in it cannot
            # trust their outputs: they end with the error, and the engine carries on
            error = RuntimeError(f"engine step failed: {type(e).__name__}: {e}")
            failed, self.live, self.streams, self.started = self.live, set(), set(), set()
            for request_id in failed:
                self.llm.abort(request_id, keep_output=False)
            return [(request_id, error) for request_id in failed]
        sent = []
        for output in outputs:
            request_id = output.request_id
            # a stream's prompt log-probs, the same in every output, cross the pipe once
            sent.append((request_id, packed(output, with_prompt_logprobs=request_id not in self.started)))
            self.started.add(request_id)
            if output.finished:
                for requests in (self.live, self.streams, self.started):
                    requests.discard(request_id)
        return sent
