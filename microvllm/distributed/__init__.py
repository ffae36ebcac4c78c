"""Scale-out on Ray: whole engines as replicas, one per GPU (or a share of the CPU cores).

- ReplicaPool (pool.py): what `LLM(..., data_parallel_size=N)` drives instead of one
  engine; it routes each request to a replica (router.py) and gathers the outputs.
- EngineReplica (replica.py): one LLMEngine inside a Ray actor. The engine in it does
  not know it is one of many.
(LLMPredictor, for Ray Data datasets, holds a whole LLM per actor: it sits above the
facade, in microvllm/ray_data.py.)
A replica is the unit of placement: tensor parallelism would make a replica span
several GPUs (a placement group per replica) without changing the facade.
"""

try:
    import ray  # noqa: F401
except ImportError:
    raise ImportError('data-parallel generation (data_parallel_size > 1) and the Ray Data path run on '
                      'Ray, which is not installed: pip install -e ".[distributed]"') from None

from .pool import ReplicaPool
from .replica import EngineReplica
from .router import Router

__all__ = ["ReplicaPool", "EngineReplica", "Router"]
