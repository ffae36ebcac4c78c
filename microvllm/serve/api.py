"""The FastAPI app: OpenAI's routes, and vLLM's tokenizer routes, over an AsyncEngine.

Every error goes back as OpenAI's error JSON ({"error": {"message", "type", "param",
"code"}}), never as a stack trace, and the server carries on. Bodies are read and
parsed here, not by FastAPI's models, so that a bad field gets the facade's own message.
"""

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..outputs import RequestOutput
from .async_engine import AsyncEngine, Call, RequestTimeout, ServerBusy
from .engine_process import RequestRefused
from .metrics import prometheus_text
from .protocol import (ApiError, GenerationRequest, ServerLimits, chat_request, completion_request,
                       detokenize_request, tokenize_request)
from .responses import ChatResponses, CompletionResponses, Responses
from .tokenization import TokenCodec, tokenizer_info

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a call that does not stream checks that its client is still there
RETRY_AFTER_S = 1
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 499: "client_closed_request", 500: "internal_server_error",
               503: "server_busy", 504: "timeout"}


@dataclass
class ServerSettings:
    model_name: str               # what /v1/models lists and requests' `model` must name
    api_key: str | None           # None: no key asked for
    max_body_bytes: int
    max_n: int


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    codec = TokenCodec(engine.info.tokenizer)
    limits = ServerLimits(engine.info.max_model_len, engine.info.vocab_size, settings.max_n)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="microvllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(settings.api_key))])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "microvllm",
                                            "max_model_len": limits.max_model_len}]}

    @v1.post("/completions")
    async def completions(request: Request):
        generation = completion_request(await _read_json(request, settings.max_body_bytes), codec, limits)
        return await generate(request, generation, CompletionResponses(
            settings.model_name, generation.params.n, generation.shape, codec, generation.prompt_texts))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        generation = chat_request(await _read_json(request, settings.max_body_bytes), codec.tokenizer, limits)
        return await generate(request, generation, ChatResponses(
            settings.model_name, generation.params.n, generation.shape, codec))

    async def generate(request: Request, generation: GenerationRequest, responses: Responses):
        if generation.model is not None and generation.model != settings.model_name:
            raise ApiError(f"model {generation.model!r} is not served here; this server serves "
                           f"{settings.model_name!r}", status=404, param="model")
        if generation.stream and not engine.info.streams:
            raise ApiError("stream: true needs one engine; this server runs data-parallel replicas, "
                           "which answer whole completions: leave stream out", param="stream")
        call = engine.submit(generation.prompts, generation.params)
        if generation.stream:
            # a stream cancelled before its first chunk never runs the generator's own cleanup
            return StreamingResponse(_events(call, responses, generation), media_type="text/event-stream",
                                     background=BackgroundTask(call.aclose))
        try:
            outputs = await _unless_disconnected(request, _finished_outputs(call, len(generation.prompts)))
        finally:
            call.close()
        return responses.body(outputs)

    app.include_router(v1)

    # vLLM's tokenizer routes, outside /v1 and open as its are: lm-evaluation-harness finds them from the URL
    @app.post("/tokenize")
    async def tokenize(request: Request):
        tokens = tokenize_request(await _read_json(request, settings.max_body_bytes), codec)
        return {"count": len(tokens), "max_model_len": limits.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        tokens = detokenize_request(await _read_json(request, settings.max_body_bytes), limits)
        return {"prompt": codec.tokenizer.decode(tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def get_tokenizer_info():
        return tokenizer_info(codec, limits.max_model_len)

    @app.get("/health")
    async def health():
        if not engine.is_running:
            raise ApiError("the engine process has exited", status=500)
        return {}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error_response(error.status, str(error), error.param, error.headers)

    @app.exception_handler(ServerBusy)
    async def server_busy(request: Request, error: ServerBusy):
        return _error_response(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestRefused)
    async def request_refused(request: Request, error: RequestRefused):
        return _error_response(400, str(error))

    @app.exception_handler(RequestTimeout)
    async def request_timeout(request: Request, error: RequestTimeout):
        return _error_response(504, str(error))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception("request failed")
        return _error_response(500, f"internal error ({type(error).__name__}); the server carries on")

    return app


def _api_key_check(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        # compared in constant time, so the answer's timing tells nothing of the key
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            raise ApiError("invalid or missing API key: send 'Authorization: Bearer KEY'", status=401)
    return check


async def _read_json(request: Request, max_bytes: int) -> dict:
    too_large = ApiError(f"the request body is larger than this server's limit of {max_bytes} bytes", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for piece in request.stream():  # a body sent without a length is counted as it comes
        body += piece
        if len(body) > max_bytes:
            raise too_large
    try:
        parsed = json.loads(body)
    except ValueError as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # the parser's depth is Python's recursion limit
        raise ApiError("the request body is nested too deeply to read") from None
    if not isinstance(parsed, dict):
        raise ApiError(f"the request body must be a JSON object, got a {type(parsed).__name__}")
    return parsed


async def _finished_outputs(call: Call, num_prompts: int) -> list[RequestOutput]:
    outputs = [None] * num_prompts
    async for prompt_index, output in call.outputs():
        outputs[prompt_index] = output
    return outputs


async def _unless_disconnected(request: Request, work):
    """`work`'s result, or cancelled (and 499) once the client has gone."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise ApiError("the client closed the request", status=499)
        return task.result()
    finally:
        task.cancel()


async def _events(call: Call, responses: Responses, generation: GenerationRequest):
    """Server-sent events: a chunk per completion per step that adds to it, the usage if
    asked for, then [DONE]. An error after the status has gone out is sent as an event."""
    try:
        for chunk in responses.first_chunks(len(generation.prompts)):
            yield _event(chunk)
        async for prompt_index, output in call.outputs():
            for chunk in responses.chunks(prompt_index, output):
                yield _event(chunk)
        if generation.include_usage:
            yield _event(responses.usage_chunk())
    except RequestRefused as e:
        yield _event(_error_json(400, str(e)))
    except RequestTimeout as e:
        yield _event(_error_json(504, str(e)))
    except Exception as e:
        logger.exception("stream failed")
        yield _event(_error_json(500, f"internal error ({type(e).__name__})"))
    finally:
        call.close()
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_json(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param,
                      "code": status}}


def _error_response(status: int, message: str, param: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_json(status, message, param), status_code=status, headers=headers)
