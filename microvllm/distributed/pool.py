"""ReplicaPool: N engine replicas on Ray, driven by the LLM facade as if they were one engine.

It implements the engine interface (engine/interface.py), so `LLM.generate` shards a
batch by adding requests and stepping as it always does; it neither streams nor forks
(a request's sequences live in a replica's process):
- add_request draws the request's seed here, in call order, from the same seed RNG a
  single engine would use, so sharding never changes which seed a request gets: greedy
  and seeded outputs equal a single engine's;
- it routes the request (Router) and holds it until the replica is next called;
- step keeps CALLS_IN_FLIGHT calls queued at each replica with work, each bringing the
  requests new to it and asking for a slice of engine steps (`step_budget_s`), waits
  for the first call to answer, and returns what finished: the next call is already
  queued, so a replica never idles through a round trip to the driver;
- a replica that dies has its unfinished requests rerun on the replicas left, under
  the same ids and seeds, with one warning; outputs of requests no longer held here
  (aborted, or already returned) are dropped, so nothing comes back twice.
"""

import dataclasses
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from ..engine.config import EngineConfig
from ..engine.interface import Engine
from ..engine.sequence import RequestIds
from ..engine.stats import EngineStats
from ..outputs import RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from ..tokenizer import Tokenizer
from ..validation import check_int
from .replica import EngineReplica
from .router import Router

RELEASE_WAIT_S = 10.0  # how long a killed actor's CPUs or GPU may take to come free
DEFAULT_STEP_BUDGET_S = 0.25  # engine time per replica call: short for a live bar, long next to a call's cost
# calls queued at a replica: with one, it idles while its answer goes to the driver and
# the next call comes back; with two, the next call is already waiting (measurements in
# docs/scale-out.md)
CALLS_IN_FLIGHT = 2


@dataclass
class _Request:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    cost: int        # outstanding tokens, for the router
    replica: int
    prefix_key: int | None
    sent: bool = False

    def as_call(self, request_id: str) -> tuple:
        return request_id, self.prompt, self.prompt_token_ids, self.params


class ReplicaPool(Engine):
    streams = False
    forks = None

    def __init__(self, config: EngineConfig, data_parallel_size: int,
                 cpu_threads_per_replica: int | None = None, step_budget_s: float = DEFAULT_STEP_BUDGET_S):
        check_int("data_parallel_size", data_parallel_size, 1)
        if cpu_threads_per_replica is not None:
            check_int("cpu_threads_per_replica", cpu_threads_per_replica, 1)
        self.tokenizer = Tokenizer.find(config.model, config.tokenizer)  # the facade parses prompts here
        if not ray.is_initialized():
            ray.init()  # joins the cluster of RAY_ADDRESS or `ray start`, else starts a local one
        config, options, cpu_threads = _placement(config, data_parallel_size, cpu_threads_per_replica)
        actor_class = ray.remote(EngineReplica)
        self.replicas = [actor_class.options(**options).remote() for _ in range(data_parallel_size)]
        try:
            infos = ray.get([r.start.remote(config, cpu_threads) for r in self.replicas])
        except RayTaskError as e:  # the replica's own error, raised as itself
            self.shutdown()
            raise e.cause from None
        self.block_size, self.max_model_len, self.vocab_size = \
            (infos[0][k] for k in ("block_size", "max_model_len", "vocab_size"))
        self.router = Router(data_parallel_size, self.block_size)
        self.step_budget_s = step_budget_s
        self.requests: dict[str, _Request] = {}   # unfinished, by request id
        self._in_flight: dict[ray.ObjectRef, int] = {}  # a replica's queued or running call -> its index
        self._replica_stats: list[EngineStats] = [info["stats"] for info in infos]  # KV blocks before any step
        # (replica, prefix key) pairs whose blocks a replica has written, or is writing now
        self._cached_prefixes: set[tuple[int, int]] = set()
        self._warming_prefixes: set[tuple[int, int]] = set()
        self._request_ids = RequestIds()
        self._seed_rng = random.Random(config.seed)

    # -- the engine interface ------------------------------------------------------------

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None,
                    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY) -> str:
        """Queue a request the facade has checked, for the replica the router picks."""
        if output_kind is not RequestOutputKind.FINAL_ONLY:
            raise ValueError(f"streamed outputs (output_kind={output_kind.name}) need one engine: "
                             "use data_parallel_size=1")
        request_id = self._request_ids.take(request_id, self.requests)
        if params.seed is None:  # drawn exactly when, and in the order, one engine would draw it
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        token_ids = list(prompt_token_ids)
        new_tokens = params.max_tokens or max(self.max_model_len - len(token_ids), 0)
        cost = len(token_ids) + params.n * new_tokens
        self.requests[request_id] = _Request(prompt, token_ids, params, cost,
                                             self.router.route(token_ids, cost),
                                             self.router.prefix_key(token_ids))
        return request_id

    def step(self) -> list[RequestOutput]:
        self._dispatch()
        if not self._in_flight:
            return []
        ready, _ = ray.wait(list(self._in_flight), num_returns=1)
        index = self._in_flight.pop(ready[0])
        try:
            finished, self._replica_stats[index] = ray.get(ready[0])
        except RayActorError as e:
            if self.replicas[index] is not None:  # its other queued call fails the same way
                self._lose_replica(index, e)
            return []
        except RayTaskError as e:  # the engine raised: its own error, as itself
            raise e.cause from e
        self._prefixes_written(index)
        return [out for out in finished if self._forget(out.request_id)]

    def abort_request(self, request_id: str) -> None:
        """Its final output stays in the replica: None."""
        request = self.requests.get(str(request_id))
        if request is not None and request.sent and self.replicas[request.replica] is not None:
            self.replicas[request.replica].abort.remote(str(request_id))
        self._forget(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def stats(self) -> EngineStats:
        """The replicas' counters added up (peaks too: the sum of each replica's peak)."""
        return EngineStats(**{f.name: sum(getattr(s, f.name) for s in self._replica_stats)
                              for f in fields(EngineStats)})

    def update_weights(self, state_dict: dict) -> None:
        """Every live replica loads the same new weights; each checks them before
        changing any, so a state dict that does not fit leaves them all on the old ones."""
        if self.requests:
            raise ValueError(f"update_weights: finish or abort the {len(self.requests)} unfinished "
                             "requests first: weights must not change under a running request")
        if isinstance(state_dict, Mapping):  # a replica's engine checks anything else, and says so
            state_dict = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                          for k, v in state_dict.items()}
        # one copy in the object store, in host memory, for all replicas
        self._on_every_replica("update_weights", ray.put(state_dict))
        self._forget_cached_prefixes()

    def reset_prefix_cache(self) -> bool:
        done = all(self._on_every_replica("reset_prefix_cache"))
        self._forget_cached_prefixes()
        return done

    def shutdown(self) -> None:
        for replica in self.replicas:
            if replica is not None:
                ray.kill(replica)
        self.replicas = [None] * len(self.replicas)

    # -- inside ---------------------------------------------------------------------------

    def _on_every_replica(self, method: str, *args) -> list:
        # an actor runs its calls in order: this one follows any run() still queued there
        calls = [getattr(r, method).remote(*args) for r in self.replicas if r is not None]
        try:
            return ray.get(calls)
        except RayTaskError as e:  # the engine raised: its own error, as itself
            raise e.cause from None

    def _forget_cached_prefixes(self) -> None:
        # a prefix recorded here lets its requests go together; the replicas hold it no more,
        # so its first request must warm it again while the others wait
        self._cached_prefixes.clear()
        self._warming_prefixes.clear()

    def _dispatch(self) -> None:
        """Queue a call at every live replica that has work and room for one.

        The first request of a prefix new to a replica goes alone: requests admitted in the
        same engine step cannot hit each other's blocks (a block is cached once its KV is
        written), so the others with that prefix wait for the next call, and a call that
        holds some back runs a single step, which writes the prefix.
        """
        queued = [0] * len(self.replicas)
        for index in self._in_flight.values():
            queued[index] += 1
        batches = {i: [] for i, r in enumerate(self.replicas) if r is not None and queued[i] < CALLS_IN_FLIGHT}
        has_work, holding = set(), set()
        for request_id, request in self.requests.items():
            index = request.replica
            if index not in batches:
                continue
            has_work.add(index)
            if request.sent:
                continue
            prefix = (index, request.prefix_key)
            if request.prefix_key is not None and prefix not in self._cached_prefixes:
                if prefix in self._warming_prefixes:
                    holding.add(index)
                    continue  # held until its prefix is written
                self._warming_prefixes.add(prefix)
            batches[index].append(request.as_call(request_id))
            request.sent = True
        for index in has_work:
            if index in holding:  # one single-step call, so the held requests follow soon after
                self._in_flight[self.replicas[index].run.remote(batches[index], 0.0)] = index
                continue
            for call in range(CALLS_IN_FLIGHT - queued[index]):  # the requests go with the first
                requests = batches[index] if call == 0 else []
                self._in_flight[self.replicas[index].run.remote(requests, self.step_budget_s)] = index

    def _prefixes_written(self, index: int) -> None:
        written = {p for p in self._warming_prefixes if p[0] == index}
        self._warming_prefixes -= written
        self._cached_prefixes |= written

    def _forget(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.router.finish(request.replica, request.cost)
        return request is not None

    def _lose_replica(self, index: int, error: Exception) -> None:
        self.replicas[index] = None
        self.router.remove(index)
        lost = [(rid, r) for rid, r in self.requests.items() if r.replica == index]
        if all(r is None for r in self.replicas):
            raise RuntimeError(f"every replica has died, {len(lost)} requests unfinished; "
                               f"the last: {error}") from error
        warnings.warn(f"replica {index} died ({type(error).__name__}); its {len(lost)} unfinished "
                      f"requests run again on the other replicas", RuntimeWarning, stacklevel=3)
        for _, request in lost:
            request.replica, request.sent = self.router.route(request.prompt_token_ids, request.cost), False


def _placement(config: EngineConfig, num_replicas: int, cpu_threads: int | None):
    """The replicas' engine config, actor options and torch threads, checked against what
    the cluster has free, so a job that cannot be placed fails now instead of waiting."""
    device = config.device or ("cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"device={device!r} names one GPU; with data_parallel_size > 1 use "
                             f"device='cuda': each replica gets a GPU of its own")
        free = _free_resources("GPU", num_replicas)
        if free < num_replicas:
            raise ValueError(f"data_parallel_size={num_replicas} needs {num_replicas} GPUs, one per "
                             f"replica, but the Ray cluster has {free:g} free")
        return dataclasses.replace(config, device="cuda"), {"num_gpus": 1, "num_cpus": cpu_threads or 1}, \
            cpu_threads
    largest_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=0)
    needed = num_replicas * (cpu_threads or 1)
    free = int(_free_resources("CPU", needed))
    cpu_threads = cpu_threads or max(1, min(free // num_replicas, largest_node))
    if cpu_threads * num_replicas > free or cpu_threads > largest_node:
        raise ValueError(f"data_parallel_size={num_replicas} with cpu_threads_per_replica={cpu_threads} "
                         f"needs {num_replicas * cpu_threads} CPUs, {cpu_threads} on one node, but the "
                         f"Ray cluster has {free} free (at most {largest_node} on a node): lower either")
    return dataclasses.replace(config, device="cpu"), {"num_cpus": cpu_threads}, cpu_threads


def _free_resources(name: str, needed: float) -> float:
    """How much of a resource is free, waiting a little for `needed` of it: actors that
    were just killed give theirs back a moment later."""
    deadline = time.monotonic() + RELEASE_WAIT_S
    while (free := ray.available_resources().get(name, 0)) < needed and time.monotonic() < deadline:
        time.sleep(0.1)
    return free
