"""The OpenAI request bodies the server takes, read into checked prompts and SamplingParams.

Every sampling field goes to SamplingParams as it came, so a bad value gets the same
message, naming the field, as a bad argument to `LLM.generate`; prompt token ids are
checked by the facade's own `checked_prompt`. Fields OpenAI or vLLM define that this
server cannot honour are refused by name unless they hold their defaults; fields
neither defines are ignored, as vLLM's server ignores them.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..prompts import checked_prompt
from ..sampling_params import RequestOutputKind, SamplingParams
from ..structured import StructuredOutputsParams, grammars
from ..structured.params import KINDS
from ..tokenizer import Tokenizer
from ..validation import check_bool, check_int, check_int_list, check_type
from .tokenization import TokenCodec

# request fields that map one to one onto SamplingParams' arguments (vLLM's extras included)
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                   "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids", "bad_words",
                   "truncate_prompt_tokens")
# fields this server does not offer, and the values that ask for nothing: OpenAI's, then vLLM's
COMPLETION_DEFAULTS_ONLY = {"suffix": (None, ""), "logit_bias": (None, {}), "best_of": (None, 1)}
CHAT_DEFAULTS_ONLY = {"logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                      "tool_choice": (None, "none", "auto"), "echo": (None, False), "prompt_logprobs": (None,),
                      "add_special_tokens": (None, False)}
VLLM_DEFAULTS_ONLY = {"use_beam_search": (None, False), "length_penalty": (None, 1), "logprob_token_ids": (None,),
                      "prompt_embeds": (None,), "priority": (None, 0), "return_token_ids": (None, False),
                      "truncation_side": (None, "left"), "cache_salt": (None,), "kv_transfer_params": (None,),
                      "vllm_xargs": (None,), "repetition_detection": (None,), "thinking_token_budget": (None, -1),
                      "watermarking": (None, False), "stream_interval": (None, 1),
                      "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
                      "chat_template": (None,), "chat_template_kwargs": (None, {}), "mm_processor_kwargs": (None, {})}
# vLLM's older names for structured_outputs' kinds
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
RESPONSE_FORMATS = ("{'type': 'text'}, {'type': 'json_object'} or "
                    "{'type': 'json_schema', 'json_schema': {'schema': {...}}}")
PROMPT_FORMS = "a str, a list of str, a list of token ids, or a list of lists of token ids"


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
class ResponseShape:
    """What the answer holds besides the completions' text and finish reasons."""
    logprobs: int | None = None    # top log-probs per token; None: no logprobs object
    echo: bool = False             # completions: the prompt's text and tokens come first
    prompt_only: bool = False      # echo with max_tokens=0: the one token run to get there is dropped
    prompt_logprobs: bool = False  # vLLM's per-choice `prompt_logprobs`
    tokens_as_ids: bool = False    # log-prob entries name tokens "token_id:N"


@dataclass
class GenerationRequest:
    """One body, read: the prompts' token ids (one engine request each) and how to sample."""
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool        # streams: a last chunk with the token counts
    model: str | None
    shape: ResponseShape = field(default_factory=ResponseShape)
    prompt_texts: list[str | None] = field(default_factory=list)  # completions: None for token ids


def completion_request(body: dict, codec: TokenCodec, limits: ServerLimits) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a str, a list of them, a list of token ids or a list
    of those; each becomes a request of `n` completions. `echo` puts the prompt first in
    the text and the log-probs (the prompt alone with `max_tokens: 0`), as lm-evaluation-
    harness scores continuations; vLLM's `prompt_logprobs: k` adds each prompt token's."""
    _refuse_non_defaults(body, COMPLETION_DEFAULTS_ONLY)
    if "prompt" not in body:
        raise ApiError("'prompt' is required", param="prompt")
    with _field_errors(body, "prompt"):
        add_special_tokens = check_bool("add_special_tokens", _given(body, "add_special_tokens", True))
        prompts = _prompts(body["prompt"], codec, add_special_tokens)
        echo = check_bool("echo", _given(body, "echo", False))
        max_tokens = body.get("max_tokens", 16)
        prompt_only = type(max_tokens) is int and max_tokens == 0  # vLLM's: the prompt, scored, no more
        if prompt_only and not echo:
            raise ValueError("max_tokens=0 answers with the prompt alone, which needs echo: true; "
                             "otherwise max_tokens must be an int >= 1")
        logprobs = body.get("logprobs")
        prompt_logprobs = body.get("prompt_logprobs")
        if prompt_logprobs is None and echo and logprobs is not None:
            prompt_logprobs = logprobs  # the echoed prompt's tokens need theirs
    shape = ResponseShape(logprobs, echo, prompt_only, body.get("prompt_logprobs") is not None,
                          _tokens_as_ids(body))
    request = _generation_request(body, [ids for _, ids in prompts], limits, 1 if prompt_only else max_tokens,
                                  logprobs, prompt_logprobs, shape)
    # a prompt cut to its last tokens is echoed as those tokens' text
    cut = request.params.truncate_prompt_tokens is not None
    request.prompt_texts = [None if cut else text for text, _ in prompts]
    return request


def _prompts(given, codec: TokenCodec, add_special_tokens: bool) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt; token ids are checked by checked_prompt later."""
    if isinstance(given, str) or (isinstance(given, list) and given and not isinstance(given[0], (str, list))):
        given = [given]
    check_type("prompt", given, list, PROMPT_FORMS)
    if not given:
        raise ValueError("prompt is an empty list: give at least one prompt")
    for i, prompt in enumerate(given):
        check_type(f"prompt[{i}]", prompt, (str, list), PROMPT_FORMS)
    return [(p, codec.encode(p, add_special_tokens)) if isinstance(p, str) else (None, p) for p in given]


def chat_request(body: dict, tokenizer: Tokenizer, limits: ServerLimits) -> GenerationRequest:
    """POST /v1/chat/completions: `messages` rendered in nanochat's chat format (a system
    message is folded into the first user message); the calculator runs by default."""
    _refuse_non_defaults(body, CHAT_DEFAULTS_ONLY)
    with _field_errors(body, "messages"):
        prompt = _rendered_chat(body, tokenizer)
        logprobs = None
        if check_bool("logprobs", _given(body, "logprobs", False)):
            logprobs = _given(body, "top_logprobs", 0)
        elif body.get("top_logprobs") is not None:
            raise ValueError("top_logprobs needs logprobs: true")
    max_tokens = _given(body, "max_completion_tokens", body.get("max_tokens"))
    return _generation_request(body, [prompt], limits, max_tokens, logprobs, None,
                               ResponseShape(logprobs, tokens_as_ids=_tokens_as_ids(body)))


def tokenize_request(body: dict, codec: TokenCodec) -> list[int]:
    """POST /tokenize, vLLM's two bodies: {"prompt": str, "add_special_tokens": bool} (true by
    default: <|bos|> first, as a text prompt runs), or a chat's {"messages": [...]} with
    `add_generation_prompt` and `continue_final_message`, rendered as chat completions render it."""
    with _field_errors(body, "prompt"):
        if "messages" in body:
            return _rendered_chat(body, codec.tokenizer)
        check_type("prompt", body.get("prompt"), str, "a str (or send 'messages' for a conversation)")
        return codec.encode(body["prompt"], check_bool("add_special_tokens", _given(body, "add_special_tokens", True)))


def detokenize_request(body: dict, limits: ServerLimits) -> list[int]:
    """POST /detokenize: {"tokens": [int, ...]}, token ids of this model's vocabulary."""
    with _field_errors(body, "tokens"):
        tokens = check_int_list("tokens", body.get("tokens"), 0)
        bad = [t for t in tokens if t >= limits.vocab_size]
        if bad:
            raise ValueError(f"tokens {bad} are out of vocabulary: ids must be in [0, {limits.vocab_size})")
    return tokens


def _rendered_chat(body: dict, tokenizer: Tokenizer) -> list[int]:
    messages = body.get("messages")
    check_type("messages", messages, list, "a list of {'role': str, 'content': str} objects")
    conversation = [_message(i, m) for i, m in enumerate(messages)]
    add_generation_prompt = check_bool("add_generation_prompt", _given(body, "add_generation_prompt", True))
    continue_final = check_bool("continue_final_message", _given(body, "continue_final_message", False))
    return tokenizer.render_chat(conversation, add_generation_prompt, continue_final)


def _tokens_as_ids(body: dict) -> bool:
    with _field_errors(body):
        return check_bool("return_tokens_as_token_ids", _given(body, "return_tokens_as_token_ids", False))


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


def _generation_request(body: dict, prompts: list[list[int]], limits: ServerLimits, max_tokens, logprobs,
                        prompt_logprobs, shape: ResponseShape) -> GenerationRequest:
    _refuse_non_defaults(body, VLLM_DEFAULTS_ONLY)
    with _field_errors(body):
        stream = check_bool("stream", _given(body, "stream", False))
        options = check_type("stream_options", _given(body, "stream_options", {}), dict,
                             "an object such as {'include_usage': true}")
        include_usage = check_bool("stream_options.include_usage", _given(options, "include_usage", False))
        if body.get("n") is not None:
            check_int("n", body["n"], 1, limits.max_n)
        kwargs = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
        structured, set_by = _structured_outputs(body)
        if structured is not None:  # the output is the constraint's, with no calculator calls inside
            _check_constraint(structured, set_by)
            kwargs.update(structured_outputs=structured, tools=None)
        params = SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        prompts = [checked_prompt(p, params, limits.vocab_size, limits.max_model_len) for p in prompts]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"model must be a str, got {type(model).__name__}", param="model")
    longest = max(map(len, prompts))
    if params.max_tokens is not None and longest + params.max_tokens > limits.max_model_len:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise ApiError(f"this model's maximum context length is {limits.max_model_len} tokens, but "
                       f"{longest} prompt tokens and {name}={params.max_tokens} ask for "
                       f"{longest + params.max_tokens}: lower {name} or shorten the prompt", param=name)
    return GenerationRequest(prompts, params, stream, include_usage, model, shape)


def _check_constraint(constraint: StructuredOutputsParams, set_by: str) -> None:
    """A constraint xgrammar cannot parse is a 400 naming the field the client set."""
    try:
        grammars.check(constraint)
    except grammars.InvalidConstraint as error:
        raise ApiError(f"{set_by} is not valid: {error.reason}", param=set_by) from None


def _structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str]:
    """The constraint and the field that set it: vLLM's `structured_outputs` ({"json": schema},
    {"regex": ...}, {"choice": [...]}, {"grammar": ...} or {"json_object": true}), or its older
    `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`, or OpenAI's `response_format`."""
    given = _given(body, "structured_outputs", None)
    guided = {name: body[name] for name in GUIDED_FIELDS if body.get(name) is not None}
    if guided:
        if given is not None or len(guided) > 1:
            names = list(guided)
            raise ValueError(f"{names[0]} and {'structured_outputs' if given is not None else names[1]} "
                             f"both given: a request takes one constraint")
        (name, value), = guided.items()
        return StructuredOutputsParams(**{GUIDED_FIELDS[name]: value}), name
    if given is not None:
        allowed = f"an object with one of {', '.join(KINDS)}"
        check_type("structured_outputs", given, dict, allowed)
        if set(given) - set(KINDS) or len(given) != 1:
            raise ValueError(f"structured_outputs must be {allowed}, got {given!r}")
        return StructuredOutputsParams(**given), f"structured_outputs.{next(iter(given))}"
    response_format = check_type("response_format", _given(body, "response_format", {"type": "text"}), dict,
                                 RESPONSE_FORMATS)
    kind = response_format.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True), "response_format"
    if kind == "json_schema":
        json_schema = check_type("response_format.json_schema", response_format.get("json_schema"), dict,
                                 "an object such as {'name': ..., 'schema': {...}}")
        schema = json_schema.get("schema")
        return (StructuredOutputsParams(json=check_type("response_format.json_schema.schema", schema, dict,
                                                        "a JSON schema object")),
                "response_format.json_schema.schema")
    if kind != "text":
        raise ValueError(f"response_format must be {RESPONSE_FORMATS}, got {response_format!r}")
    return None, "response_format"


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
