"""EngineReplica: one whole LLMEngine, run inside a Ray actor by ReplicaPool.

The engine is built in `start` rather than `__init__`: an exception in an actor's
constructor reaches the caller only as "the actor died", while one raised by a method
reaches it as itself (a FileNotFoundError for a bad model path, say).
"""

import time

import torch

from ..engine.config import EngineConfig
from ..engine.llm_engine import LLMEngine


class EngineReplica:
    def start(self, config: EngineConfig, cpu_threads: int | None) -> dict:
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.engine = LLMEngine(config)
        return {"block_size": self.engine.block_size, "max_model_len": self.engine.max_model_len,
                "vocab_size": self.engine.vocab_size, "stats": self.engine.stats}

    def run(self, requests: list[tuple], budget_s: float):
        """Queue `requests` (request_id, prompt, prompt_token_ids, params), then step for
        about `budget_s` seconds (one step at least) or until nothing is left.

        Returns the outputs that finished and the engine's stats. The pool has checked
        the requests with the engine's rules already.
        """
        for request_id, prompt, token_ids, params in requests:
            self.engine.add_request(prompt, token_ids, params, request_id)
        finished = []
        deadline = time.perf_counter() + budget_s
        while self.engine.has_unfinished_requests():
            finished += self.engine.step()
            if time.perf_counter() >= deadline:
                break
        return finished, self.engine.stats

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def update_weights(self, state_dict: dict) -> None:
        """Load the pool's new weights (Ray hands the object ref's value) and reset the prefix cache."""
        self.engine.update_weights(state_dict)

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()
