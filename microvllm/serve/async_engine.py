"""AsyncEngine: the server's asynchronous front over an EngineProcess.

A call's requests go to the engine as commands; they join the running batch at its
next step. A receiver thread waits on the engine's results and hands them to the event
loop in one `call_soon_threadsafe`, where each output goes to the queue of the call
that owns it. When the loop falls behind the engine, a call finds several steps'
outputs queued and takes them as one (the streamed deltas joined), so a busy server
sends fewer, larger chunks instead of falling further behind. A call that ends early
(its client gone, its time up) aborts what it has not seen finish, which frees those
requests' blocks at once.
"""

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .deltas import joined_deltas
from .engine_process import EngineProcess, StepResults
from .wire import unpacked

THROUGHPUT_WINDOW_S = 10.0  # tokens per second are counted over this much recent time


class ServerBusy(Exception):
    """The waiting queue has no room for a call's sequences: it may try again shortly."""


class RequestTimeout(Exception):
    """A call ran past the server's per-request time limit and was aborted."""


class AsyncEngine:
    def __init__(self, engine: EngineProcess, max_seqs_in_flight: int, request_timeout_s: float | None):
        self.engine = engine
        self.info = engine.info
        self.max_seqs_in_flight = max_seqs_in_flight  # running and waiting; more calls get ServerBusy
        self.request_timeout_s = request_timeout_s
        # only the event loop touches what follows
        self.num_seqs_in_flight = 0
        self.num_aborted_requests = 0
        self.num_refused_calls = 0
        self.stats = engine.info.stats               # the engine's, as of its last step (or its load)
        self._generated = deque()                    # (time, generated tokens): the window's samples
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> the queue of the call owning it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: threading.Thread | None = None

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._receiver = threading.Thread(target=self._receive, name="microvllm-results", daemon=True)
        self._receiver.start()

    def stop(self) -> None:
        self.engine.stop()
        self._receiver.join()

    @property
    def is_running(self) -> bool:
        return self.engine.is_alive

    # -- calls ----------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> "Call":
        """Queue one request per prompt (checked already), or raise ServerBusy."""
        num_seqs = len(prompts) * params.n
        if self.num_seqs_in_flight + num_seqs > self.max_seqs_in_flight:
            self.num_refused_calls += 1
            raise ServerBusy(f"the server holds {self.num_seqs_in_flight} sequences and takes at most "
                             f"{self.max_seqs_in_flight}: try again shortly")
        if not self.engine.is_alive:
            raise RuntimeError("the engine process has exited")
        call = Call(self, [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompts))], prompts, num_seqs)
        for request_id in call.request_ids:
            self._queues[request_id] = call.queue
        self.num_seqs_in_flight += num_seqs
        self.engine.send([("add", r, p, params) for r, p in zip(call.request_ids, prompts)])
        return call

    def tokens_per_second(self) -> float:
        """Tokens generated over the last THROUGHPUT_WINDOW_S seconds, per second."""
        self._forget_old_samples()
        if not self._generated:
            return 0.0
        return (self.stats.generated_tokens - self._generated[0][1]) / THROUGHPUT_WINDOW_S

    def _forget_old_samples(self) -> None:
        too_old = time.monotonic() - THROUGHPUT_WINDOW_S
        while self._generated and self._generated[0][0] < too_old:
            self._generated.popleft()

    def end_call(self, call: "Call") -> None:
        """Forget a call's requests, aborting those it has not seen finish (Call.close)."""
        self.num_seqs_in_flight -= call.num_seqs
        for request_id in call.request_ids:
            self._queues.pop(request_id, None)
        if call.unfinished and self.engine.is_alive:
            self.num_aborted_requests += len(call.unfinished)
            self.engine.send([("abort", r) for r in call.unfinished])

    # -- results --------------------------------------------------------------------------

    def _receive(self) -> None:
        """The receiver thread: each step's results, handed to the loop in one callback."""
        while True:
            try:
                steps = self.engine.receive()
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._engine_gone)
                return
            self._loop.call_soon_threadsafe(self._deliver, steps)

    def _deliver(self, steps: list[StepResults]) -> None:
        for results, stats in steps:
            for request_id, result in results:
                queue = self._queues.get(request_id)
                if queue is not None:  # else its call has ended and aborted it
                    queue.put_nowait((request_id, result))
            # the count before this step's tokens: a window that starts here counts them
            self._generated.append((time.monotonic(), self.stats.generated_tokens))
            self.stats = stats
        self._forget_old_samples()

    def _engine_gone(self) -> None:
        error = RuntimeError("the engine process has exited")
        for request_id, queue in self._queues.items():
            queue.put_nowait((request_id, error))


class Call:
    """The requests of one HTTP call: their outputs as they come, and an abort for those
    not finished when the caller leaves (close() is safe to call more than once)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], prompts: list[list[int]], num_seqs: int):
        self.engine = engine
        self.request_ids = request_ids
        self.prompts = prompts
        self.num_seqs = num_seqs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(request_ids)
        self.closed = False
        # one timer per call, not one per output awaited: at the limit it queues the error
        self._timer = None if engine.request_timeout_s is None else \
            asyncio.get_running_loop().call_later(engine.request_timeout_s, self._time_up)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine makes them, until every request has finished;
        a request's outputs queued meanwhile come as one."""
        index = {r: i for i, r in enumerate(self.request_ids)}
        while self.unfinished:
            queued = [await self.queue.get()]
            while not self.queue.empty():
                queued.append(self.queue.get_nowait())
            by_request: dict[str, list[RequestOutput]] = {}
            for request_id, result in queued:
                if isinstance(result, Exception):
                    raise result
                by_request.setdefault(request_id, []).append(unpacked(result, self.prompts[index[request_id]]))
            for request_id, outputs in by_request.items():
                output = joined_deltas(outputs)
                if output.finished:
                    self.unfinished.discard(request_id)
                yield index[request_id], output

    def _time_up(self) -> None:
        self.queue.put_nowait((None, RequestTimeout(f"the request ran past the server's limit of "
                                                    f"{self.engine.request_timeout_s:g} s and was aborted")))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
            self.engine.end_call(self)

    async def aclose(self) -> None:
        """close() for Starlette's background tasks, which run a plain function in a thread
        of their pool but a coroutine on the event loop."""
        self.close()
