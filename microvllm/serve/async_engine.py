"""AsyncEngine: the server's asynchronous front over one LLM, stepped by a background thread.

The event loop never touches the engine. A call hands its requests to the engine thread
through an inbox; between steps the thread adds them (they join the running batch at
the next step) and applies aborts, steps while any request is unfinished, and sends each
step's outputs back to the loop in one `call_soon_threadsafe`, where they go to the
queue of the call that owns them. A call that ends early (its client gone, its time up)
aborts what it has not seen finish, which frees those requests' blocks at once.
"""

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from ..engine.stats import EngineStats
from ..llm import LLM
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0  # tokens per second are counted over this much recent time


class ServerBusy(Exception):
    """The waiting queue has no room for a call's sequences: it may try again shortly."""


class RequestTimeout(Exception):
    """A call ran past the server's per-request time limit and was aborted."""


class AsyncEngine:
    def __init__(self, llm: LLM, max_seqs_in_flight: int, request_timeout_s: float | None):
        self.llm = llm
        self.max_seqs_in_flight = max_seqs_in_flight  # running and waiting; more calls get ServerBusy
        self.request_timeout_s = request_timeout_s
        # the loop's side: only coroutines and callbacks on the event loop touch these
        self.num_seqs_in_flight = 0
        self.num_aborted_requests = 0
        self.num_refused_calls = 0
        self.stats = EngineStats()                  # the engine's, as of its last step
        self._generated = deque()                   # (time, generated tokens), the window's samples
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> the queue of the call owning it
        self._loop: asyncio.AbstractEventLoop | None = None
        # shared with the engine thread, under _wakeup
        self._inbox: list[tuple] = []               # ("add", id, token ids, params) or ("abort", id)
        self._closing = False
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        # the engine thread's own: requests it added and has not seen finish
        self._live: set[str] = set()

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="microvllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- calls (on the event loop) --------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> "Call":
        """Queue one request per prompt (checked already), or raise ServerBusy."""
        num_seqs = len(prompts) * params.n
        if self.num_seqs_in_flight + num_seqs > self.max_seqs_in_flight:
            self.num_refused_calls += 1
            raise ServerBusy(f"the server holds {self.num_seqs_in_flight} sequences and takes at most "
                             f"{self.max_seqs_in_flight}: try again shortly")
        call = Call(self, [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompts))], num_seqs)
        for request_id in call.request_ids:
            self._queues[request_id] = call.queue
        self.num_seqs_in_flight += num_seqs
        self._send([("add", r, p, params) for r, p in zip(call.request_ids, prompts)])
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

    def _send(self, commands: list[tuple]) -> None:
        with self._wakeup:
            self._inbox += commands
            self._wakeup.notify()

    def _close(self, call: "Call") -> None:
        self.num_seqs_in_flight -= call.num_seqs
        for request_id in call.request_ids:
            self._queues.pop(request_id, None)
        if call.unfinished:
            self.num_aborted_requests += len(call.unfinished)
            self._send([("abort", r) for r in call.unfinished])

    def _deliver(self, results: list[tuple[str, RequestOutput | Exception]], stats: EngineStats) -> None:
        for request_id, result in results:
            queue = self._queues.get(request_id)
            if queue is not None:  # else its call has ended and aborted it
                queue.put_nowait((request_id, result))
        # the count before this step's tokens: a window that starts here counts them
        self._generated.append((time.monotonic(), self.stats.generated_tokens))
        self._forget_old_samples()
        self.stats = stats

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._inbox or self._closing or self.llm.has_unfinished_requests()):
                    self._wakeup.wait()
                if self._closing:
                    return
                inbox, self._inbox = self._inbox, []
            results = [result for command in inbox for result in self._apply(command)]
            if self.llm.has_unfinished_requests():
                results += self._step()
            stats = dataclasses.replace(self.llm.engine.stats)  # the loop reads a copy no step changes
            self._loop.call_soon_threadsafe(self._deliver, results, stats)

    def _apply(self, command: tuple) -> list[tuple[str, Exception]]:
        if command[0] == "abort":
            self._live.discard(command[1])
            self.llm.abort(command[1], keep_output=False)
            return []
        _, request_id, token_ids, params = command
        try:
            self.llm.add_request({"prompt_token_ids": token_ids}, params, request_id)
        except Exception as e:  # checked on the loop already; whatever is left goes to its caller
            return [(request_id, e)]
        self._live.add(request_id)
        return []

    def _step(self) -> list[tuple[str, RequestOutput | Exception]]:
        try:
            outputs = self.llm.step()
        except Exception as e:
            # the engine is left as if the step had not run; the requests in it cannot trust
            # their outputs, so they end with the error and the server carries on
            logger.exception("engine step failed: its requests are aborted")
            failed, self._live = self._live, set()
            for request_id in failed:
                self.llm.abort(request_id, keep_output=False)
            return [(request_id, e) for request_id in failed]
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
        return [(output.request_id, output) for output in outputs]


class Call:
    """The requests of one HTTP call: their outputs as they come, and an abort for those
    not finished when the caller leaves (close() is safe to call more than once)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], num_seqs: int):
        self.engine = engine
        self.request_ids = request_ids
        self.num_seqs = num_seqs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(request_ids)
        self.closed = False
        self._deadline = None if engine.request_timeout_s is None else time.monotonic() + engine.request_timeout_s

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine makes them, until every request has finished."""
        index = {r: i for i, r in enumerate(self.request_ids)}
        while self.unfinished:
            request_id, result = await self._next()
            if isinstance(result, Exception):
                raise result
            if result.finished:
                self.unfinished.discard(request_id)
            yield index[request_id], result

    async def _next(self) -> tuple[str, RequestOutput | Exception]:
        if self._deadline is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), self._deadline - time.monotonic())
        except TimeoutError:
            raise RequestTimeout(f"the request ran past the server's limit of "
                                 f"{self.engine.request_timeout_s:g} s and was aborted") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine._close(self)
