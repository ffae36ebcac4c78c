"""GET /metrics: the engine's load and counters in Prometheus' text format."""

from .async_engine import THROUGHPUT_WINDOW_S, AsyncEngine


def prometheus_text(engine: AsyncEngine) -> str:
    stats = engine.stats
    metrics = [
        ("num_requests_running", "gauge", "Sequences in the engine's running batch.", stats.running_seqs),
        ("num_requests_waiting", "gauge", "Sequences waiting for a place in the running batch.",
         stats.waiting_seqs),
        ("kv_cache_blocks_used", "gauge", "KV cache blocks held by running sequences.", stats.used_blocks),
        ("kv_cache_blocks_total", "gauge", "KV cache blocks in all.", stats.total_blocks),
        ("prefix_cache_hit_rate", "gauge", "Share of admitted prompt tokens served from the prefix cache.",
         stats.prefix_cache_hit_rate),
        ("generation_tokens_per_second", "gauge", f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s.",
         engine.tokens_per_second()),
        ("prompt_tokens_total", "counter", "Prompt tokens admitted.", stats.prompt_tokens),
        ("generation_tokens_total", "counter", "Tokens generated.", stats.generated_tokens),
        ("preemptions_total", "counter", "Sequences preempted for KV blocks.", stats.preemptions),
        ("spec_decode_num_drafts_total", "counter", "Sequence steps whose guessed tokens were checked.",
         stats.spec_decode_num_drafts),
        ("spec_decode_num_draft_tokens_total", "counter", "Guessed tokens checked.", stats.spec_decode_num_draft_tokens),
        ("spec_decode_num_accepted_tokens_total", "counter", "Guessed tokens accepted.",
         stats.spec_decode_num_accepted_tokens),
        ("requests_aborted_total", "counter", "Requests aborted: client gone or time limit reached.",
         engine.num_aborted_requests),
        ("requests_refused_total", "counter", "Calls answered 503: the waiting queue was full.",
         engine.num_refused_calls),
    ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP microvllm_{name} {help_text}", f"# TYPE microvllm_{name} {kind}",
                  f"microvllm_{name} {value:g}" if isinstance(value, float) else f"microvllm_{name} {value}"]
    return "\n".join(lines) + "\n"
