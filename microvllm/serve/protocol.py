"""The OpenAI request bodies the server takes, read into checked prompts and SamplingParams.

Every sampling field goes to SamplingParams as it came, so a bad value gets the same
message, naming the field, as a bad argument to `LLM.generate`; prompts are parsed and
checked by the facade's own functions (prompts.py). Fields OpenAI defines that this
server cannot honour are refused by name unless they hold their defaults; fields
neither OpenAI nor vLLM defines are ignored, as vLLM's server ignores them.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass

from ..prompts import checked_prompt, parse_prompts
from ..sampling_params import RequestOutputKind, SamplingParams
from ..structured import StructuredOutputsParams
from ..structured.params import KINDS
from ..tokenizer import Tokenizer
from ..validation import check_bool, check_int, check_type

# request fields that map one to one onto SamplingParams' arguments (vLLM's extras included)
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                   "include_stop_str_in_output", "skip_special_tokens")
# OpenAI's fields this server does not offer, and the values that ask for nothing
COMPLETION_DEFAULTS_ONLY = {"echo": (False,), "suffix": (None, ""), "logit_bias": (None, {}), "best_of": (None, 1)}
CHAT_DEFAULTS_ONLY = {"logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                      "tool_choice": (None, "none", "auto")}
RESPONSE_FORMATS = "{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'schema': {...}}}"


class ApiError(Exception):
    """An error the client caused (or must wait out), answered as OpenAI's error JSON."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


@dataclass
class ServerLimits:
    max_model_len: int
    vocab_size: int
    max_n: int


@dataclass
class GenerationRequest:
    """One body, read: the prompts' token ids (one engine request each) and how to sample."""
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool        # streams: a last chunk with the token counts
    model: str | None


def completion_request(body: dict, tokenizer: Tokenizer, limits: ServerLimits) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a str, a list of them, a list of token ids or a list
    of those; each becomes a request of `n` completions."""
    _refuse_non_defaults(body, COMPLETION_DEFAULTS_ONLY)
    if "prompt" not in body:
        raise ApiError("'prompt' is required", param="prompt")
    with _field_errors(body, "prompt"):
        parsed = parse_prompts(body["prompt"], tokenizer)
    if not parsed:
        raise ApiError("prompt is an empty list: give at least one prompt", param="prompt")
    return _generation_request(body, [ids for _, ids in parsed], limits,
                               max_tokens=body.get("max_tokens", 16), logprobs=body.get("logprobs"))


def chat_request(body: dict, tokenizer: Tokenizer, limits: ServerLimits) -> GenerationRequest:
    """POST /v1/chat/completions: `messages` rendered in nanochat's chat format (a system
    message is folded into the first user message); the calculator runs by default."""
    _refuse_non_defaults(body, CHAT_DEFAULTS_ONLY)
    messages = body.get("messages")
    with _field_errors(body, "messages"):
        check_type("messages", messages, list, "a list of {'role': str, 'content': str} objects")
        conversation = [_message(i, m) for i, m in enumerate(messages)]
        add_generation_prompt = check_bool("add_generation_prompt", _given(body, "add_generation_prompt", True))
        continue_final = check_bool("continue_final_message", _given(body, "continue_final_message", False))
        prompt = tokenizer.render_chat(conversation, add_generation_prompt, continue_final)
        logprobs = None
        if check_bool("logprobs", _given(body, "logprobs", False)):
            logprobs = _given(body, "top_logprobs", 0)
        elif body.get("top_logprobs") is not None:
            raise ValueError("top_logprobs needs logprobs: true")
    max_tokens = _given(body, "max_completion_tokens", body.get("max_tokens"))
    return _generation_request(body, [prompt], limits, max_tokens, logprobs)


def _message(i: int, message) -> dict:
    check_type(f"messages[{i}]", message, dict, "a {'role': str, 'content': str} object")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI's content parts: only text ones
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{i}].content[{j}] must be a {{'type': 'text', 'text': str}} part")
        content = "".join(part["text"] for part in content)
    check_type(f"messages[{i}].content", content, str, "a str or a list of text parts")
    check_type(f"messages[{i}].role", message.get("role"), str, "'system', 'user' or 'assistant'")
    return {"role": message["role"], "content": content}


def _generation_request(body: dict, prompts: list[list[int]], limits: ServerLimits,
                        max_tokens, logprobs) -> GenerationRequest:
    with _field_errors(body):
        stream = check_bool("stream", _given(body, "stream", False))
        options = check_type("stream_options", _given(body, "stream_options", {}), dict,
                             "an object such as {'include_usage': true}")
        include_usage = check_bool("stream_options.include_usage", _given(options, "include_usage", False))
        if body.get("n") is not None:
            check_int("n", body["n"], 1, limits.max_n)
        kwargs = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
        structured = _structured_outputs(body)
        if structured is not None:  # the output is the constraint's, with no calculator calls inside
            kwargs.update(structured_outputs=structured, tools=None)
        params = SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs,
                                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        prompts = [checked_prompt(p, params, limits.vocab_size, limits.max_model_len) for p in prompts]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"model must be a str, got {type(model).__name__}", param="model")
    longest = max(map(len, prompts))
    if params.max_tokens is not None and longest + params.max_tokens > limits.max_model_len:
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise ApiError(f"this model's maximum context length is {limits.max_model_len} tokens, but "
                       f"{longest} prompt tokens and {field}={params.max_tokens} ask for "
                       f"{longest + params.max_tokens}: lower {field} or shorten the prompt", param=field)
    return GenerationRequest(prompts, params, stream, include_usage, model)


def _structured_outputs(body: dict) -> StructuredOutputsParams | None:
    """vLLM's `structured_outputs` ({"json": schema}, {"regex": ...}, {"choice": [...]},
    {"grammar": ...} or {"json_object": true}), or OpenAI's `response_format`."""
    given = _given(body, "structured_outputs", None)
    if given is not None:
        allowed = f"an object with one of {', '.join(KINDS)}"
        check_type("structured_outputs", given, dict, allowed)
        if set(given) - set(KINDS) or len(given) != 1:
            raise ValueError(f"structured_outputs must be {allowed}, got {given!r}")
        return StructuredOutputsParams(**given)
    response_format = check_type("response_format", _given(body, "response_format", {"type": "text"}), dict,
                                 RESPONSE_FORMATS)
    kind = response_format.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        json_schema = check_type("response_format.json_schema", response_format.get("json_schema"), dict,
                                 "an object such as {'name': ..., 'schema': {...}}")
        schema = json_schema.get("schema")
        return StructuredOutputsParams(json=check_type("response_format.json_schema.schema", schema, dict,
                                                       "a JSON schema object"))
    if kind != "text":
        raise ValueError(f"response_format must be {RESPONSE_FORMATS}, got {response_format!r}")
    return None


def _given(body: dict, name: str, default):
    """A field's value, or `default` where it is left out or null (as clients send unset fields)."""
    value = body.get(name)
    return default if value is None else value


def _refuse_non_defaults(body: dict, defaults_only: dict[str, tuple]) -> None:
    for name, defaults in defaults_only.items():
        if name in body and body[name] not in defaults:
            raise ApiError(f"{name}={body[name]!r} is not supported by this server; leave it out",
                           param=name)


@contextmanager
def _field_errors(body: dict, param: str | None = None):
    """Turns a TypeError or ValueError of the facade's checks into a 400 whose `param` is the
    request field its message starts with (else `param`)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        name = re.match(r"[\w.\[\]]*", str(error)).group()
        raise ApiError(str(error), param=name if re.split(r"[.\[]", name)[0] in body else param) from None
