"""LLM: the user-facing facade, shaped like vLLM's offline `LLM` class."""

import time

from tqdm.auto import tqdm

from .engine.config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .validation import check_int

PROMPT_FORMS = "a str, a {'prompt': str} or {'prompt_token_ids': [int, ...]} dict, or a list of token ids"


class LLM:
    """Offline batched generation with a nanochat checkpoint.

    `LLM(model=DIR)` loads the largest step in DIR and finds the tokenizer beside it;
    the keyword arguments are EngineConfig's (step, device, dtype, block_size,
    num_blocks, kv_cache_memory, gpu_memory_utilization, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_prefix_caching, attention_backend,
    enforce_eager, logit_softcap, seed).

    `data_parallel_size=N` runs N engine replicas on Ray (one GPU each, or on CPU
    `cpu_threads_per_replica` cores each, by default an equal share) and shards every
    batch across them; see microvllm/distributed.
    """

    def __init__(self, model: str, tokenizer: str | None = None, data_parallel_size: int = 1,
                 cpu_threads_per_replica: int | None = None, **engine_args):
        config = EngineConfig(model=str(model), tokenizer=tokenizer, **engine_args)
        if check_int("data_parallel_size", data_parallel_size, 1) == 1:
            self.engine = LLMEngine(config)
        else:  # replicas that look like one engine from here
            from .distributed import ReplicaPool
            self.engine = ReplicaPool(config, data_parallel_size, cpu_threads_per_replica)
        self.tokenizer = self.engine.tokenizer
        # outputs of add_request() requests that finished while generate() drove the engine
        self._unclaimed_outputs: list[RequestOutput] = []

    # -- batch generation -------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for all prompts; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                               and isinstance(prompts[0], int)):
            prompts = [prompts]
        parsed = [self._parse_prompt(p) for p in prompts]
        params = self._params_per_prompt(sampling_params, len(parsed))
        for (_, token_ids), p in zip(parsed, params):
            self.engine.validate_prompt(token_ids, p)  # before any is queued: all or nothing
        return self._run([self.engine.add_request(text, ids, p) for (text, ids), p in zip(parsed, params)],
                         use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Reply to one conversation (a list of {'role', 'content'} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.tokenizer.render_chat(c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        outputs: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        start, num_in, num_out = time.perf_counter(), 0, 0
        try:
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
            for request_id in pending:  # interrupted: leave the engine clean and usable
                self.engine.abort_request(request_id)
        return [outputs[r] for r in request_ids]

    def _parse_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            if isinstance(prompt.get("prompt_token_ids"), (list, tuple)):
                return None, list(prompt["prompt_token_ids"])
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"a prompt must be {PROMPT_FORMS}; got {type(prompt).__name__}")

    @staticmethod
    def _params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if not isinstance(sampling_params, (list, tuple)) or \
                not all(isinstance(p, SamplingParams) for p in sampling_params):
            raise ValueError("sampling_params must be a SamplingParams or a list of them")
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling params for {num_prompts} prompts; "
                             "give one, or one per prompt")
        return list(sampling_params)

    # -- driving the engine by hand -----------------------------------------------------

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        text, token_ids = self._parse_prompt(prompt)
        return self.engine.add_request(text, token_ids, sampling_params or SamplingParams(), request_id)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it (or since the last step)."""
        unclaimed, self._unclaimed_outputs = self._unclaimed_outputs, []
        return unclaimed + self.engine.step()

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to return."""
        return bool(self._unclaimed_outputs) or self.engine.has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        """Drop a request; its KV blocks are freed at once."""
        self.engine.abort_request(request_id)
