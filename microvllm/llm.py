"""LLM: the user-facing facade, shaped like vLLM's offline `LLM` class."""

import copy
import threading
import time
from collections.abc import Mapping
from dataclasses import fields

import torch
from tqdm.auto import tqdm

from .engine.beam_search import BeamSearch
from .engine.config import EngineConfig, ServedModelConfig
from .engine.interface import Engine
from .engine.interrupts import interrupts_held
from .engine.llm_engine import LLMEngine
from . import unsupported
from .outputs import BeamSearchOutput, RequestOutput
from .prompts import checked_prompt, parse_prompt, parse_prompts
from .sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from .unsupported import check_arguments
from .validation import check_bool, check_int, check_type

ENGINE_SETTINGS = {f.name for f in fields(EngineConfig)} - {"model", "tokenizer"}
# named for typo suggestions when an unknown keyword comes with vLLM's others
GENERATE_PARAMS = ("prompts", "sampling_params", "use_tqdm")
CHAT_PARAMS = ("messages", "sampling_params", "use_tqdm", "add_generation_prompt", "continue_final_message")


class LLM:
    """Offline batched generation with a nanochat checkpoint.

    `LLM(model=DIR)` loads the largest step in DIR and finds the tokenizer beside it;
    `model` may also be a transformers-format dir, a nanochat SOURCE[:TAG] such as
    "sft:d20", or a Hugging Face hub id (model/sources.py). The keyword arguments are
    EngineConfig's (step, revision, device, dtype, block_size,
    num_blocks, kv_cache_memory, gpu_memory_utilization, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_prefix_caching, attention_backend,
    enforce_eager, logit_softcap, quantization, seed, speculative_config).

    `speculative_config={"method": "ngram", "num_speculative_tokens": k}` (vLLM's
    spelling; also "prompt_lookup_min"/"prompt_lookup_max", or {"model": DIR, ...} for a
    draft model) checks guessed tokens in each step: the same outputs, sooner where the
    guesses are right (microvllm/speculative).

    `data_parallel_size=N` runs N engine replicas on Ray (one GPU each, or on CPU
    `cpu_threads_per_replica` cores each, by default an equal share) and shards every
    batch across them; see microvllm/distributed.

    One LLM serves one call at a time: calls from other threads wait their turn.
    """

    def __init__(self, model: str, tokenizer: str | None = None, data_parallel_size: int = 1,
                 cpu_threads_per_replica: int | None = None, **engine_args):
        engine_args = check_arguments("LLM", engine_args, ENGINE_SETTINGS, unsupported.LLM_ARGS)
        config = EngineConfig(model=model, tokenizer=tokenizer, **engine_args)
        self.engine: Engine
        if check_int("data_parallel_size", data_parallel_size, 1) == 1:
            self.engine = LLMEngine(config)
        else:  # replicas that look like one engine from here
            from .distributed.pool import ReplicaPool
            self.engine = ReplicaPool(config, data_parallel_size, cpu_threads_per_replica)
        self.tokenizer = self.engine.tokenizer
        self.model_config = ServedModelConfig(config.model, self.engine.max_model_len)
        # outputs of add_request() requests that came while generate(), beam_search() or
        # step_request() drove the engine, for the next step()
        self._unclaimed_outputs: list[RequestOutput] = []
        self._lock = threading.Lock()  # the engine's queues are not safe to share between threads

    # -- batch generation -------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, **vllm_only) -> list[RequestOutput]:
        """Generate completions for all prompts; outputs come back in input order.

        vLLM's further arguments (lora_request, priority, ...) are accepted at their defaults."""
        check_arguments("LLM.generate", vllm_only, GENERATE_PARAMS, unsupported.GENERATE_ARGS)
        if not callable(use_tqdm):
            check_bool("use_tqdm", use_tqdm)
        parsed = parse_prompts(prompts, self.tokenizer)
        params = self._params_per_prompt(sampling_params, len(parsed))
        # all checked before any is queued: all or nothing
        parsed = [(text, self._checked(token_ids, p)) for (text, token_ids), p in zip(parsed, params)]
        with self._lock:
            return self._run(parsed, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, *, add_generation_prompt: bool = True,
             continue_final_message: bool = False, **vllm_only) -> list[RequestOutput]:
        """Reply to one conversation (a list of {'role', 'content'} dicts) or a list of them.

        As in vLLM, add_generation_prompt=True starts a new assistant reply, while
        continue_final_message=True (with add_generation_prompt=False) goes on with the
        conversation's last, assistant, message. vLLM's other arguments (chat_template,
        lora_request, tools, ...) are accepted at their defaults: nanochat's format is fixed.
        """
        check_arguments("LLM.chat", vllm_only, CHAT_PARAMS, unsupported.CHAT_ARGS)
        check_bool("add_generation_prompt", add_generation_prompt)
        check_bool("continue_final_message", continue_final_message)
        check_type("messages", messages, (list, tuple), "a conversation (a list of {'role': str, "
                   "'content': str} dicts) or a list of conversations")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        for i, conversation in enumerate(conversations):
            check_type(f"messages[{i}]", conversation, (list, tuple),
                       "a conversation: a list of {'role': str, 'content': str} dicts")
            for j, message in enumerate(conversation):
                where = f"message {j}" + (f" of conversation {i}" if len(conversations) > 1 else "")
                check_type(where, message, dict, "a {'role': str, 'content': str} dict")
                for key in ("role", "content"):
                    if key not in message:
                        raise ValueError(f"{where} has no {key!r}: a message is a "
                                         "{'role': str, 'content': str} dict")
        prompts = [{"prompt_token_ids": self.tokenizer.render_chat(c, add_generation_prompt, continue_final_message)}
                   for c in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out in outputs:  # the rendered conversation, special tokens and all
            out.prompt = self.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
        return outputs

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """The params.beam_width best continuations of each prompt, in input order.

        The beams run in the engine's batches beside any requests already added; those
        that finish meanwhile come back from the next step().
        """
        check_type("params", params, BeamSearchParams, "a BeamSearchParams")
        check_bool("use_tqdm", use_tqdm)
        search = BeamSearch(self.engine, params)
        # all checked before any is queued: all or nothing
        parsed = [(text, self._checked(token_ids, search.sampling_params))
                  for text, token_ids in parse_prompts(prompts, self.tokenizer)]
        with self._lock:
            return self._beam_search(search, parsed, use_tqdm)

    def _beam_search(self, search: BeamSearch, parsed: list[tuple], use_tqdm: bool) -> list[BeamSearchOutput]:
        for text, token_ids in parsed:
            search.add(text, token_ids)
        bar = tqdm(total=len(parsed), desc="Beam search", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while not search.is_finished:
                self._unclaimed_outputs += search.step()
                bar.update(search.num_finished - bar.n)
        finally:
            bar.close()
            search.abort()  # interrupted: leave the engine clean and usable
        return search.outputs()

    def _run(self, prompts: list[tuple], params: list[SamplingParams], use_tqdm) -> list[RequestOutput]:
        request_ids, pending = [], set()
        outputs: dict[str, RequestOutput] = {}
        # use_tqdm may also be a tqdm-like factory, e.g. for a bar with another description
        make_bar = use_tqdm if callable(use_tqdm) else tqdm
        bar = make_bar(total=len(prompts), desc="Processed prompts", disable=not use_tqdm,
                       dynamic_ncols=True)
        start, num_in, num_out = time.perf_counter(), 0, 0
        try:
            with interrupts_held():  # all queued, or all aborted below
                for (text, token_ids), p in zip(prompts, params):
                    request_ids.append(self.engine.add_request(text, token_ids, p))
                    pending.add(request_ids[-1])
            while pending:
                for out in self.engine.step():
                    if out.request_id not in pending:
                        self._unclaimed_outputs.append(out)  # for the next step()
                        continue
                    pending.discard(out.request_id)
                    outputs[out.request_id] = out
                    num_in += len(out.prompt_token_ids)
                    num_out += sum(len(c.token_ids) for c in out.outputs)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"input: {num_in / elapsed:.0f} toks/s, "
                                        f"output: {num_out / elapsed:.0f} toks/s", refresh=False)
                    bar.update(1)
        finally:
            bar.close()
            for request_id in pending:  # failed or interrupted: queue nothing, leave the engine usable
                self.engine.abort_request(request_id)
        return [outputs[r] for r in request_ids]

    def _checked(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        return checked_prompt(prompt_token_ids, params, self.engine.vocab_size, self.engine.max_model_len)

    @staticmethod
    def _params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        allowed = "a SamplingParams, a list of them (one per prompt) or None"
        check_type("sampling_params", sampling_params, (list, tuple), allowed)
        for i, p in enumerate(sampling_params):
            check_type(f"sampling_params[{i}]", p, SamplingParams, "a SamplingParams")
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling params for {num_prompts} prompts; "
                             "give one, or one per prompt")
        return list(sampling_params)

    # -- driving the engine by hand -----------------------------------------------------

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request for step() to run; its output comes back once, finished,
        unless sampling_params.output_kind asks for a stream. The one way a single request
        reaches the engine (llm_engine.add_request too): parsed and checked here, then queued."""
        if sampling_params is not None:
            check_type("sampling_params", sampling_params, SamplingParams, "a SamplingParams or None")
        params = sampling_params or SamplingParams()
        text, token_ids = parse_prompt(prompt, self.tokenizer)
        token_ids = self._checked(token_ids, params)
        with self._lock, interrupts_held():
            return self.engine.add_request(text, token_ids, params, request_id,
                                           params.output_kind or RequestOutputKind.FINAL_ONLY)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it (or since the last step)."""
        with self._lock:
            unclaimed, self._unclaimed_outputs = self._unclaimed_outputs, []
            return unclaimed + self.engine.step()

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to return."""
        return bool(self._unclaimed_outputs) or self.engine.has_unfinished_requests()

    def abort(self, request_id: str, keep_output: bool = True) -> None:
        """Drop a request; its KV blocks are freed at once, and (keep_output) the next
        step() returns its final output with finish_reason "abort"."""
        with self._lock:
            output = self.engine.abort_request(request_id)
            if not keep_output:
                self._unclaimed_outputs = [o for o in self._unclaimed_outputs if o.request_id != request_id]
            elif output is not None:
                self._unclaimed_outputs.append(output)

    def step_request(self, request_id: str) -> list[RequestOutput]:
        """One engine step for a driver that serves one request among others: the outputs
        of `request_id` (and any it had waiting); the others' wait for the next step()."""
        with self._lock:
            outputs = self._unclaimed_outputs + self.engine.step()
            self._unclaimed_outputs = [o for o in outputs if o.request_id != request_id]
            return [o for o in outputs if o.request_id == request_id]

    # -- vLLM-shaped access -------------------------------------------------------------

    def get_tokenizer(self):
        """The nanochat Tokenizer: encode(text), decode(ids), render_chat(messages)."""
        return self.tokenizer

    @property
    def llm_engine(self) -> "EngineRequests":
        """vLLM's LLMEngine request loop: add_request(request_id, prompt, params),
        abort_request(request_id), step() (streams by default), has_unfinished_requests();
        and its model_config (max_model_len)."""
        return EngineRequests(self)

    # -- RL weight refresh --------------------------------------------------------------

    def update_weights(self, weights: Mapping[str, torch.Tensor] | torch.nn.Module) -> None:
        """Serve new weights from now on: a state dict in nanochat's names (a checkpoint's,
        `_orig_mod.` prefixes allowed) or a GPT module, whose state_dict() is read.

        Loaded in place into the running engine (every replica with data_parallel_size > 1),
        which keeps its KV cache; the prefix cache is reset. A state dict that does not fit
        raises ValueError before any weight changes. No request may be unfinished."""
        state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        with self._lock:
            self.engine.update_weights(state_dict)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix; True when done, as vLLM's."""
        with self._lock:
            return self.engine.reset_prefix_cache()


class EngineRequests:
    """`llm.llm_engine`: the request-by-id loop vLLM's LLMEngine offers, over an LLM,
    and its model_config.

    As in vLLM, a request whose params leave output_kind unset is streamed: step()
    returns its output so far (finished=False) at every step that adds tokens, then the
    finished one. LLM.add_request keeps to finished outputs unless output_kind says so.
    """

    def __init__(self, llm: LLM):
        self._llm = llm

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, **vllm_only) -> str:
        check_arguments("add_request", vllm_only, (), unsupported.ADD_REQUEST_ARGS)
        if params is None:
            params = SamplingParams(output_kind=RequestOutputKind.CUMULATIVE)
        elif isinstance(params, SamplingParams) and params.output_kind is None:
            params = copy.copy(params)  # the caller's stay as they are
            params.output_kind = RequestOutputKind.CUMULATIVE
        return self._llm.add_request(prompt, params, request_id)

    def abort_request(self, request_id) -> None:
        for r in [request_id] if isinstance(request_id, str) else request_id:
            self._llm.abort(r)

    def step(self) -> list[RequestOutput]:
        return self._llm.step()

    def has_unfinished_requests(self) -> bool:
        return self._llm.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self._llm.engine.num_unfinished_requests()

    def get_tokenizer(self):
        return self._llm.tokenizer

    @property
    def model_config(self) -> ServedModelConfig:
        return self._llm.model_config
