"""EngineStats: counters the engine keeps as it runs, and its load now (for benchmarks,
progress bars and a server's metrics); StepTimer: the device time of a step, for the
opt-in per-step timing."""

import time
from dataclasses import dataclass
from typing import Callable


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
    # the load after the last step or abort (a replica pool adds them up over replicas)
    running_seqs: int = 0
    waiting_seqs: int = 0
    used_blocks: int = 0
    total_blocks: int = 0
    # with step_timing=True: the host's wall time in step() and the device's time on the
    # step's work; host well above device means the GPU waits for the host
    timed_steps: int = 0
    step_host_seconds: float = 0.0
    step_device_seconds: float = 0.0
    # speculative decoding: sequences whose guesses a step checked (one draft each per
    # step), the guesses checked, and those accepted
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0

    def record_step(self, scheduled, result, scheduler, step_start: float) -> None:
        """Count a step that ran: `scheduled` (ScheduledSequences), the runner's StepOutput,
        the scheduler after it, and when the step began (perf_counter)."""
        self.steps += 1
        self.forward_seconds += result.forward_seconds
        self.computed_tokens += sum([s.num_new_tokens for s in scheduled])
        self.generated_tokens += len(result.sampled_seqs)
        self.preemptions = scheduler.num_preemptions
        self.prompt_tokens = scheduler.admitted_prompt_tokens
        self.cached_prompt_tokens = scheduler.cached_prompt_tokens
        self.record_load(scheduler)
        self.peak_used_blocks = max(self.peak_used_blocks, self.used_blocks)
        self.peak_running_seqs = max(self.peak_running_seqs, self.running_seqs)
        if result.device_seconds is not None:
            self.timed_steps += 1
            self.step_host_seconds += time.perf_counter() - step_start
            self.step_device_seconds += result.device_seconds

    def record_guesses(self, settled) -> None:
        """Count a step's checked guesses (speculator.SettledGuesses), after record_step:
        they ran through the model, and the rows of rejected ones emitted nothing."""
        self.spec_decode_num_drafts += settled.num_drafts
        self.spec_decode_num_draft_tokens += settled.num_draft_tokens
        self.spec_decode_num_accepted_tokens += settled.num_accepted_tokens
        self.computed_tokens += settled.num_draft_tokens
        self.generated_tokens -= settled.num_draft_tokens - settled.num_accepted_tokens

    def record_load(self, scheduler) -> None:
        self.running_seqs, self.waiting_seqs = len(scheduler.running), len(scheduler.waiting)
        self.used_blocks = scheduler.block_manager.num_used_blocks
        self.total_blocks = scheduler.block_manager.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Of the guesses checked, the share accepted."""
        return (self.spec_decode_num_accepted_tokens / self.spec_decode_num_draft_tokens
                if self.spec_decode_num_draft_tokens else 0.0)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a sequence emits per step that checked its guesses (accepted ones + 1)."""
        return (1 + self.spec_decode_num_accepted_tokens / self.spec_decode_num_drafts
                if self.spec_decode_num_drafts else 0.0)

    @property
    def host_ms_per_step(self) -> float | None:
        return 1e3 * self.step_host_seconds / self.timed_steps if self.timed_steps else None

    @property
    def device_ms_per_step(self) -> float | None:
        return 1e3 * self.step_device_seconds / self.timed_steps if self.timed_steps else None


class StepTimer:
    """Device time from start() to stop(), on the platform's clock (Platform.device_clock)."""

    def __init__(self, device_clock: Callable[[], Callable[[], float]]):
        self.device_clock = device_clock
        self.elapsed: Callable[[], float] | None = None

    def start(self) -> None:
        self.elapsed = self.device_clock()

    def stop(self) -> float:
        return self.elapsed()
