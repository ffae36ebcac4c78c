"""Engine: a stand-in for nanochat's own `nanochat.engine.Engine`, over an LLM.

nanochat's scripts (chat_eval, chat_rl, chat_cli, chat_web) sample through
`Engine(model, tokenizer)`: `generate` streams one column of tokens per step, one per
sample row, with masks (1 sampled, 0 forced by the calculator), and `generate_batch`
returns whole rows that start with the prompt. This class keeps those calls and their
conventions and runs them on microvllm's continuous batching:

    from microvllm.nanochat import Engine
    engine = Engine("~/.cache/nanochat/chatsft_checkpoints/d20")   # or Engine(LLM(...))
    results, masks = engine.generate_batch(prompt_tokens, num_samples=8, max_tokens=256)

Speed comes from `generate_many`, which runs every prompt's samples in one batch where
nanochat's scripts call generate_batch once per prompt.

The calculator runs as in nanochat (SamplingParams(tools="auto")): the answer is forced
after `<|python_end|>`, masked 0, and counts toward max_tokens. Rows end at
`<|assistant_end|>` or `<|bos|>` (the engine's EOS ids). Greedy rows equal nanochat's
token for token on the same checkpoint in float32. Sampled rows follow microvllm's
seeding: each row has its own noise, drawn from `seed` and the row's index, so the same
seed gives the same rows, though not nanochat's (it shares one generator across rows).

`evaluate_core(llm, bundle_dir)`, nanochat's base_eval CORE metric, lives in
microvllm.core_eval and is importable from here under nanochat's name.
"""

from collections import deque
from collections.abc import Iterator, Sequence
from os import PathLike

from .core_eval import evaluate_core  # noqa: F401  (nanochat's name, where its users look)
from .llm import LLM
from .outputs import CompletionOutput
from .sampling_params import RequestOutputKind, SamplingParams

Row = list[int]


class Engine:
    """nanochat's Engine calls over `llm` (an LLM, or a checkpoint dir to load one from
    with `llm_kwargs`). `tokenizer` is accepted for nanochat's signature and not used:
    the LLM has its own."""

    def __init__(self, llm: LLM | str | PathLike, tokenizer: object = None, **llm_kwargs):
        if isinstance(llm, LLM):
            if llm_kwargs:
                raise ValueError(f"LLM arguments {sorted(llm_kwargs)} need a checkpoint dir, "
                                 "not an LLM that is built already")
            self.llm = llm
        else:
            self.llm = LLM(str(llm), **llm_kwargs)
        self.tokenizer = tokenizer
        self._num_streams = 0

    # -- nanochat's calls ------------------------------------------------------------------

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Yields (token_column, token_masks), one entry per sample row, until every row
        has ended or max_tokens columns have come (None: until max_model_len).

        As in nanochat, the token that ends a row is yielded. After it, where nanochat
        goes on sampling tokens nobody reads, an ended row repeats its last token with
        mask 0 (it was not sampled), so a caller that watches for the terminal token
        sees it again. A tool's answer arrives in one engine step and is yielded one
        token per column, as nanochat forces it."""
        params = sampling_params(num_samples, max_tokens, temperature, top_k, seed)
        params.output_kind = RequestOutputKind.DELTA
        self._num_streams += 1
        request_id = f"nanochat-stream-{id(self)}-{self._num_streams}"
        self.llm.add_request({"prompt_token_ids": tokens}, params, request_id)
        pending = [deque() for _ in range(num_samples)]   # (token, mask) not yielded yet
        last: list[tuple[int, int] | None] = [None] * num_samples
        ended = [False] * num_samples
        finished = False
        try:
            while True:
                # a column is due once every row still running has its next token
                while any(pending) and all(p or e for p, e in zip(pending, ended)):
                    column = []
                    for row, queue in enumerate(pending):
                        if queue:
                            last[row] = queue.popleft()
                            column.append(last[row])
                        else:
                            column.append((last[row][0] if last[row] else self._end_token, 0))
                    yield [t for t, _ in column], [m for _, m in column]
                if finished:
                    return
                for output in self.llm.step_request(request_id):
                    for completion in output.outputs:
                        pending[completion.index].extend(zip(completion.token_ids, completion.token_masks))
                        ended[completion.index] = completion.finished()
                    finished = output.finished
        finally:
            if not finished:   # the caller stopped early (nanochat's generate_batch does)
                self._abort(request_id)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                       ) -> tuple[list[Row], list[Row]]:
        """(results, masks): per sample row, the prompt then the generated tokens, without
        the `<|assistant_end|>` or `<|bos|>` that ended it; masks 0 on the prompt, 0 on
        forced tokens, 1 on sampled ones."""
        return self.generate_many([tokens], num_samples, max_tokens, temperature, top_k, seed)[0]

    # -- microvllm's addition --------------------------------------------------------------

    def generate_many(self, prompts: Sequence[list[int]], num_samples: int = 1, max_tokens: int | None = None,
                      temperature: float = 1.0, top_k: int | None = None,
                      seed: int | Sequence[int] = 42) -> list[tuple[list[Row], list[Row]]]:
        """generate_batch for every prompt at once, in one continuous batch: a list of
        (results, masks), one per prompt, in order. `seed` is one for all prompts (as
        calling generate_batch per prompt with it gives) or one per prompt."""
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts: give one, or one per prompt")
        params = [sampling_params(num_samples, max_tokens, temperature, top_k, s) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        eos = self.llm.tokenizer.eos_token_ids
        batches = []
        for prompt, out in zip(prompts, outputs):
            rows = [rows_of(prompt, c, eos) for c in out.outputs]
            batches.append(([tokens for tokens, _ in rows], [masks for _, masks in rows]))
        return batches

    # -- driving the LLM for a stream ------------------------------------------------------

    @property
    def _end_token(self) -> int:
        return self.llm.tokenizer.special["<|assistant_end|>"]

    def _abort(self, request_id: str) -> None:
        self.llm.abort(request_id, keep_output=False)  # nobody waits for it


def sampling_params(num_samples: int, max_tokens: int | None, temperature: float, top_k: int | None,
                    seed: int) -> SamplingParams:
    """nanochat's sampling arguments as SamplingParams: top_k None (or 0) means all tokens,
    max_tokens None means until max_model_len; no text is decoded (nobody reads it)."""
    return SamplingParams(n=num_samples, temperature=temperature, top_k=-1 if not top_k else top_k,
                          seed=seed, max_tokens=max_tokens, detokenize=False, tools="auto")


def rows_of(prompt: list[int], completion: CompletionOutput, eos_token_ids: frozenset[int]) -> tuple[Row, Row]:
    """One generate_batch row: (prompt + output, masks), the terminal token left out."""
    token_ids, masks = list(completion.token_ids), list(completion.token_masks)
    if completion.finish_reason == "stop" and token_ids and token_ids[-1] in eos_token_ids:
        token_ids, masks = token_ids[:-1], masks[:-1]
    return list(prompt) + token_ids, [0] * len(prompt) + masks
