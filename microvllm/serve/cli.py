"""`python -m microvllm.serve MODEL` (or `microvllm-serve MODEL`): load the model, then serve it.

The engine flags are LLM's settings, one per EngineConfig field, spelt as vLLM's
(`--max-num-seqs`, `--dtype`, `--no-enable-prefix-caching`), plus
`--data-parallel-size` for Ray replicas.
"""

import argparse
import logging
import os
import typing
from dataclasses import MISSING, fields

import uvicorn

from ..engine.config import EngineConfig
from ..model.attention import ATTENTION_BACKENDS
from ..model.quantization import QUANTIZATIONS
from ..validation import json_object_argument
from .api import ServerSettings, build_app
from .async_engine import AsyncEngine
from .engine_process import EngineProcess

logger = logging.getLogger(__name__)

ENGINE_FLAG_TYPES = (bool, int, float, str, dict)
# what each engine flag does, and what leaving it out means where its default is None
ENGINE_FLAG_HELP = {
    "tokenizer": "dir holding tokenizer.pkl or tokenizer.json (default: found beside the model)",
    "step": "checkpoint step (default: the largest)",
    "revision": "of a hub id: a branch, tag or commit (default: main)",
    "device": "cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    "dtype": "float32, bfloat16, float16, or vLLM's half and float (default: bfloat16 on cuda and on "
             "CPUs with bfloat16 instructions, float32 on other CPUs; float16 runs as bfloat16 on a CPU)",
    "block_size": "tokens per KV block (default: the attention backend's)",
    "num_blocks": "KV blocks (default: sized from the memory budget)",
    "kv_cache_memory": "bytes for the KV cache (default: on cpu, room for max-num-seqs full-length "
                       "sequences, at most half the RAM available once the weights are loaded; on cuda, "
                       "from --gpu-memory-utilization)",
    "gpu_memory_utilization": "on cuda without --kv-cache-memory: the share of GPU memory to fill",
    "max_num_seqs": "sequences in the running batch",
    "max_num_batched_tokens": "tokens one engine step computes at most",
    "max_model_len": "prompt and output tokens together (default: the model's sequence_len)",
    "enable_prefix_caching": "reuse the KV blocks of shared prompt prefixes",
    "attention_backend": "one of " + ", ".join(ATTENTION_BACKENDS),
    "enforce_eager": "on cuda: no CUDA graphs for decode steps",
    "logit_softcap": "the final logits' softcap (default: the checkpoint's)",
    "quantization": " or ".join(QUANTIZATIONS) + " weights, made at load time (default: none)",
    "seed": "draws the seeds of requests that set none",
    "step_timing": "measure each step's host and device milliseconds",
    "speculative_config": "speculative decoding, as JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
                          "or '{\"model\": DRAFT_DIR, \"num_speculative_tokens\": 4}' (default: none)",
    "cpu_threads": "the engine's torch threads on cpu (default: $OMP_NUM_THREADS if set, else the "
                   "cores this process may use less those other processes keep busy, less one for "
                   "the HTTP server, at least one)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microvllm-serve", description="An OpenAI-compatible server "
                                     "(/v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                                     "/tokenizer_info, /health, /metrics).")
    parser.add_argument("model", help="a checkpoint dir, a nanochat SOURCE[:TAG] or a hub id, as LLM(model=...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--api-key", default=os.environ.get("MICROVLLM_API_KEY"),
                        help="ask every /v1 request for 'Authorization: Bearer KEY' (default: $MICROVLLM_API_KEY)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: MODEL as given)")
    parser.add_argument("--max-waiting-seqs", type=int, default=1024,
                        help="sequences that may wait beyond the running batch; calls past it get 503")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a call may run before it is aborted (0: no limit)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="the largest request body; a larger one gets 413 (default 4 MiB)")
    parser.add_argument("--max-n", type=int, default=128, help="the largest n a request may ask for")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="engine replicas on Ray; with more than one, streams are refused")
    parser.add_argument("--cpu-threads-per-replica", type=int,
                        help="with --data-parallel-size above 1 on cpu: torch threads of each replica "
                             "(default: an equal share of the usable cores)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="engine steps whose outputs reach clients together: fewer, larger stream "
                             "chunks, at up to this many steps of extra latency (default 1)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="the server's logging, uvicorn's included (default info)")
    engine = parser.add_argument_group("engine settings (as LLM's keyword arguments)")
    for field in fields(EngineConfig):
        if field.name != "model":
            _add_engine_flag(engine, field)
    return parser


def _add_engine_flag(group, field) -> None:
    flag = "--" + field.name.replace("_", "-")
    default = None if field.default is MISSING else field.default
    kind = next(t for t in ENGINE_FLAG_TYPES if t is field.type or t in typing.get_args(field.type))
    text = ENGINE_FLAG_HELP.get(field.name, "")
    if default is not None and "default:" not in text:
        text += f" (default: {default})"
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    elif kind is dict:
        group.add_argument(flag, type=json_object_argument, default=default, help=text)
    else:
        group.add_argument(flag, type=kind, default=default, help=text)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.stream_interval < 1:
        parser.error(f"--stream-interval must be at least 1, got {args.stream_interval}")
    llm_args = {f.name: getattr(args, f.name) for f in fields(EngineConfig)}
    try:
        process = EngineProcess({**llm_args, "data_parallel_size": args.data_parallel_size,
                                 "cpu_threads_per_replica": args.cpu_threads_per_replica},
                                args.stream_interval)
    except (TypeError, ValueError, FileNotFoundError) as e:  # a bad model or setting: said as a flag error
        parser.error(str(e))
    logger.info(f"loaded {args.model}, served as {args.served_model_name or args.model!r}")
    for record in process.info.startup_log:  # the engine's dtype, device, threads and KV cache
        if logging.getLogger(record.name).isEnabledFor(record.levelno):
            logging.getLogger(record.name).handle(record)
    max_running = args.max_num_seqs * args.data_parallel_size
    engine = AsyncEngine(process, max_running + args.max_waiting_seqs, args.request_timeout or None)
    app = build_app(engine, ServerSettings(args.served_model_name or args.model, args.api_key,
                                           args.max_body_bytes, args.max_n))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
