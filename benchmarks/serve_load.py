"""Serving under load: clients arriving as a Poisson process stream completions from a
server; their time to first token, inter-token latency and the server's throughput,
next to LLM.generate's offline throughput on the same requests.

    python -m benchmarks.serve_load                                  # saturation: all at once
    python -m benchmarks.serve_load --rate 20 --num-requests 200     # 20 new clients a second
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --served-model-name NAME   # any server

Without --url it starts `python -m microvllm.serve MODEL` on a free loopback port with the
engine flags given here, and runs the offline pass after the server has stopped, so the
two never share the CPU. Requests are synthetic token-id prompts with fixed output
lengths (ignore_eos), greedy, so both passes do exactly the same work.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import local_server
from benchmarks.metrics import format_table, percentile
from benchmarks.workloads import BenchRequest, synthetic_requests
from microvllm.serve.engine_process import default_engine_threads

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(REPO / "models" / "shakespeare-d4")


@dataclass
class ClientRecord:
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    completion_tokens: int = 0


async def one_client(url: urllib.parse.SplitResult, model: str, request: BenchRequest) -> ClientRecord:
    """One streamed completion over a connection of its own. The clients share the machine's
    cores with the server, so they speak plain HTTP/1.1 over asyncio's streams and look
    into no chunk but the last, leaving the cores to what is measured."""
    body = json.dumps({"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    record = ClientRecord(time.perf_counter())
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(f"POST {url.path.rstrip('/')}/v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"the server answered {status.decode().strip()}: {(await reader.read()).decode()}")
        while await reader.readline() not in (b"\r\n", b""):  # the headers: chunked, as SSE is sent
            pass
        while size := int((await reader.readline()).split(b";")[0], 16):
            chunk = await reader.readexactly(size + 2)  # the chunk and its CRLF: one or more events
            if b'"usage":{' in chunk or b'"usage": {' in chunk:  # the last event but [DONE]: the token count
                usage = next(e for e in chunk.split(b"\n\n") if b'"usage":{' in e or b'"usage": {' in e)
                record.completion_tokens = json.loads(usage.removeprefix(b"data: "))["usage"]["completion_tokens"]
            elif b"[DONE]" not in chunk:
                record.chunk_times.append(time.perf_counter())
    finally:
        writer.close()
    return record


async def run_clients(url: str, model: str, requests: list[BenchRequest], rate: float,
                      seed: int) -> tuple[list[ClientRecord], float]:
    """Launch a client per request, the gaps between launches exponential with mean 1/rate."""
    rng = random.Random(seed)
    parts = urllib.parse.urlsplit(url)
    await one_client(parts, model, requests[0])  # warm-up
    start = time.perf_counter()
    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(one_client(parts, model, request)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    records = await asyncio.gather(*tasks)
    return records, time.perf_counter() - start


def offline_throughput(args, requests: list[BenchRequest]) -> tuple[float, float]:
    """Output tokens per second of LLM.generate on the same requests, and CPU seconds per
    token: the best of --repeats passes on one LLM, as the served passes share one server."""
    from microvllm import LLM, SamplingParams
    llm = LLM(args.model, **engine_args(args))
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up, as the clients' first request
    passes = []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        passes.append((tokens / (time.perf_counter() - start), (time.process_time() - cpu_start) / tokens))
    return max(passes)


def engine_args(args) -> dict:
    return {"max_num_seqs": args.max_num_seqs, "dtype": args.dtype, "cpu_threads": args.cpu_threads}


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = local_server.free_port()
    command = [sys.executable, "-m", "microvllm.serve", args.model, "--port", str(port), "--log-level", "warning",
               "--served-model-name", args.served_model_name, "--stream-interval", str(args.stream_interval)]
    for name, value in engine_args(args).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return local_server.start(command, port, REPO)


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """User and system CPU time of the server's HTTP process and of its engine process (its
    child), all their threads (Linux)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return {"server http": local_server.cpu_seconds(f"/proc/{pid}/stat"),
            "server engine": sum(local_server.cpu_seconds(f"/proc/{c}/stat") for c in children)}


def report(records: list[ClientRecord], wall_s: float, cpu: dict[str, float], offline: tuple | None) -> str:
    ttfts = [r.chunk_times[0] - r.sent for r in records if r.chunk_times]
    itls = [b - a for r in records for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.completion_tokens for r in records)
    served_tok_s = tokens / wall_s
    ms = lambda x: f"{1e3 * x:.1f}"
    rows = [["TTFT ms", ms(percentile(ttfts, 50)), ms(percentile(ttfts, 99))],
            ["inter-token ms", ms(percentile(itls, 50)), ms(percentile(itls, 99))]]
    lines = [format_table(["latency", "p50", "p99"], rows), "",
             f"requests {len(records)} | output tokens {tokens} | {wall_s:.2f} s | "
             f"served {served_tok_s:.0f} tok/s | {len(records) / wall_s:.2f} req/s"]
    if offline is not None:
        offline_tok_s, offline_cpu = offline
        lines.append(f"offline LLM.generate {offline_tok_s:.0f} tok/s | served / offline "
                     f"{served_tok_s / offline_tok_s:.2f}x")
        cpu["offline"] = offline_cpu * tokens
    # on a machine with few cores the clients take CPU from the server: CPU time per token
    # shows what serving costs apart from that
    lines.append("CPU ms per output token: " + " | ".join(f"{name} {1e3 * s / tokens:.2f}" for name, s in cpu.items()))
    return "\n".join(lines)


def served_run(url: str, args, requests: list[BenchRequest], server: subprocess.Popen | None) -> tuple:
    """(client records, wall seconds, CPU seconds by whom) of one pass of the clients."""
    server_cpu, client_cpu = server_cpu_seconds(server.pid) if server else {}, time.process_time()
    with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
        records, wall_s = runner.run(run_clients(url, args.served_model_name, requests, args.rate, args.seed))
    cpu = {"clients": time.process_time() - client_cpu}
    if server is not None:  # the warm-up request's share is small next to the run's
        cpu |= {name: s - server_cpu[name] for name, s in server_cpu_seconds(server.pid).items()}
    return records, wall_s, cpu


def _fastest_loop():
    """uvloop's event loop where it is installed (uvicorn's standard extra brings it), else asyncio's."""
    try:
        import uvloop
        return uvloop.new_event_loop
    except ImportError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--url", help="an OpenAI-compatible server already running (no offline pass then)")
    parser.add_argument("--served-model-name", default="model")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--rate", type=float, default=float("inf"), help="clients a second (default: all at once)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-threads", type=int,
                        help="the engine's threads on both sides (default: $OMP_NUM_THREADS, else the server's "
                             "own choice, which leaves a core for its HTTP process)")
    parser.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes of each kind; the fastest counts (on a busy machine, the least disturbed)")
    args = parser.parse_args(argv)
    if args.cpu_threads is None:  # the offline engine runs with the server's count: the ratio is serving's cost
        args.cpu_threads = int(os.environ.get("OMP_NUM_THREADS") or default_engine_threads())

    from microvllm.tokenizer import Tokenizer
    tokenizer = Tokenizer.find(args.model)
    requests = synthetic_requests(args.num_requests, tuple(args.prompt_len), tuple(args.output_len),
                                  min(tokenizer.special_ids), tokenizer.bos_id, args.seed)
    server, url = (None, args.url) if args.url else start_server(args)
    try:
        runs = [served_run(url, args, requests, server) for _ in range(args.repeats)]
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    records, wall_s, cpu = min(runs, key=lambda run: run[1])
    offline = None if args.url else offline_throughput(args, requests)
    print(f"{args.num_requests} requests at {args.rate} req/s | engine threads {args.cpu_threads} on both sides"
          f" | best of {args.repeats}")
    print(report(records, wall_s, cpu, offline))

if __name__ == "__main__":
    main()
