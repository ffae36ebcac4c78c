"""Benchmark arithmetic: per-request latencies, percentiles, KV usage, run summaries, tables.

A run is summarised from what every engine mode and the no-cache baseline can give:
each request's prompt and output token counts with its RequestMetrics timestamps, the
run's wall time, and, for engine runs, EngineStats and the KV usage at the peak.
"""

import math
import re
from dataclasses import asdict, dataclass, fields

from microvllm import RequestMetrics

PERCENTILES = (50, 90, 99)
SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass
class RequestRecord:
    num_prompt_tokens: int
    num_output_tokens: int
    metrics: RequestMetrics


@dataclass
class KVUsage:
    block_size: int
    total_blocks: int
    bytes_per_block: int
    peak_blocks: int       # blocks in use at the step that used the most
    tokens_at_peak: int    # tokens whose KV those blocks held then


@dataclass
class RunSummary:
    mode: str
    num_prompts: int
    input_tokens: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    total_tok_s: float
    requests_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    computed_tokens: int           # tokens run through the model (no-cache: padding included)
    peak_running_seqs: int
    block_size: int | None = None
    total_blocks: int | None = None
    peak_blocks: int | None = None
    peak_block_frac: float | None = None     # peak blocks / total blocks
    kv_util_at_peak: float | None = None     # tokens held / slots of the blocks in use
    kv_reserved_bytes: int | None = None     # the whole KV cache
    kv_peak_bytes: int | None = None         # blocks in use at the peak
    kv_live_bytes: int | None = None         # slots actually holding a token then
    prefix_hit_rate: float | None = None
    preemptions: int | None = None
    host_ms_per_step: float | None = None    # with step timing: wall time of a step on the host
    device_ms_per_step: float | None = None  # ... and of its work on the device

    def as_dict(self) -> dict:
        return asdict(self)


SUMMARY_FIELDS = [f.name for f in fields(RunSummary)]


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def time_per_output_token(record: RequestRecord) -> float | None:
    """Decode latency after the first token; undefined for a single output token."""
    m = record.metrics
    if record.num_output_tokens < 2 or m.first_token_time is None or m.finished_time is None:
        return None
    return (m.finished_time - m.first_token_time) / (record.num_output_tokens - 1)


def kv_utilisation(tokens_held: int, blocks_used: int, block_size: int) -> float:
    """Share of the slots in the used blocks that hold a token (the rest is waste)."""
    return tokens_held / (blocks_used * block_size) if blocks_used else 0.0


def summarize(mode: str, records: list[RequestRecord], wall_s: float, computed_tokens: int,
              peak_running_seqs: int, stats=None, kv: KVUsage | None = None) -> RunSummary:
    """One run's figures; `stats` (EngineStats) and `kv` are None for the no-cache baseline."""
    input_tokens = sum(r.num_prompt_tokens for r in records)
    output_tokens = sum(r.num_output_tokens for r in records)
    ttfts = [r.metrics.time_to_first_token for r in records if r.metrics.time_to_first_token is not None]
    tpots = [t for t in map(time_per_output_token, records) if t is not None]
    summary = RunSummary(
        mode, len(records), input_tokens, output_tokens, wall_s,
        output_tokens / wall_s, (input_tokens + output_tokens) / wall_s, len(records) / wall_s,
        *(percentile(ttfts, p) for p in PERCENTILES), *(percentile(tpots, p) for p in PERCENTILES),
        computed_tokens, peak_running_seqs)
    if stats is not None:
        summary.prefix_hit_rate = stats.prefix_cache_hit_rate
        summary.preemptions = stats.preemptions
        summary.host_ms_per_step, summary.device_ms_per_step = stats.host_ms_per_step, stats.device_ms_per_step
    if kv is not None:
        summary.block_size, summary.total_blocks, summary.peak_blocks = \
            kv.block_size, kv.total_blocks, kv.peak_blocks
        summary.peak_block_frac = kv.peak_blocks / kv.total_blocks
        summary.kv_util_at_peak = kv_utilisation(kv.tokens_at_peak, kv.peak_blocks, kv.block_size)
        summary.kv_reserved_bytes = kv.total_blocks * kv.bytes_per_block
        summary.kv_peak_bytes = kv.peak_blocks * kv.bytes_per_block
        summary.kv_live_bytes = kv.tokens_at_peak * kv.bytes_per_block // kv.block_size
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- sizes ------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes from '1073741824', '256M', '1.5G' or '512KiB' (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size: give bytes, optionally with K, M, G or T "
                         "(e.g. 256M, 1G)")
    return int(float(m.group(1)) * SIZE_SUFFIXES[m.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# -- tables -----------------------------------------------------------------------------

def _ms(x):
    return f"{x * 1e3:.1f} ms"


def _pct(x):
    return f"{x * 100:.1f}%"


# (label, RunSummary field, how to show it); fields that are None in every run are skipped
TABLE_ROWS = [
    ("prompts", "num_prompts", str),
    ("input tokens", "input_tokens", str),
    ("output tokens", "output_tokens", str),
    ("wall time", "wall_s", lambda x: f"{x:.2f} s"),
    ("output tokens/s", "output_tok_s", lambda x: f"{x:.1f}"),
    ("total tokens/s", "total_tok_s", lambda x: f"{x:.1f}"),
    ("requests/s", "requests_s", lambda x: f"{x:.2f}"),
    *((f"TTFT p{p}", f"ttft_p{p}_s", _ms) for p in PERCENTILES),
    *((f"TPOT p{p}", f"tpot_p{p}_s", _ms) for p in PERCENTILES),
    ("tokens computed", "computed_tokens", str),
    ("peak running seqs", "peak_running_seqs", str),
    ("block size", "block_size", str),
    ("peak KV blocks", "peak_blocks", str),
    ("peak blocks / total", "peak_block_frac", _pct),
    ("KV utilisation at peak", "kv_util_at_peak", _pct),
    ("KV reserved", "kv_reserved_bytes", format_bytes),
    ("KV in used blocks", "kv_peak_bytes", format_bytes),
    ("KV holding tokens", "kv_live_bytes", format_bytes),
    ("prefix-cache hit rate", "prefix_hit_rate", _pct),
    ("preemptions", "preemptions", str),
    ("host ms / step", "host_ms_per_step", lambda x: f"{x:.2f}"),
    ("device ms / step", "device_ms_per_step", lambda x: f"{x:.2f}"),
]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def summary_table(summaries: list[RunSummary]) -> str:
    """The runs side by side, one column per mode."""
    rows = []
    for label, name, show in TABLE_ROWS:
        values = [getattr(s, name) for s in summaries]
        if any(v is not None for v in values):
            rows.append([label] + ["-" if v is None else show(v) for v in values])
    return format_table(["metric"] + [s.mode for s in summaries], rows)
