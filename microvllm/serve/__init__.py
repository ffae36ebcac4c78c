"""An OpenAI-compatible HTTP server over the engine: `python -m microvllm.serve MODEL`.

engine_process.py runs the engine in a process of its own, its outputs crossing the pipe
as wire.py's tuples; async_engine.py hands each request's outputs to its caller (deltas.py
joins those that queue up); protocol.py reads request bodies into SamplingParams;
tokenization.py encodes text prompts and names tokens as the server does;
responses.py builds OpenAI's bodies and stream chunks; api.py holds the routes;
metrics.py the Prometheus text; cli.py the command line.
"""

from ..extras import import_serve

# named here, so that any import of the server without its extra says how to get it
import_serve("fastapi")
import_serve("uvicorn")
