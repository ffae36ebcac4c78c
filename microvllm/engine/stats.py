"""EngineStats: counters the engine keeps as it runs, for benchmarks and progress bars."""

from dataclasses import dataclass


@dataclass
class EngineStats:
    steps: int = 0
    forward_seconds: float = 0.0        # inside the model forward (attention and KV writes included)
    prompt_tokens: int = 0              # prompt tokens of admitted requests
    cached_prompt_tokens: int = 0       # of those, served from the prefix cache or a sibling
    computed_tokens: int = 0            # tokens run through the model, recomputations included
    generated_tokens: int = 0
    preemptions: int = 0
    peak_used_blocks: int = 0
    peak_running_seqs: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
