"""OpenAI's response bodies and stream chunks, built from the engine's RequestOutputs.

One builder per HTTP call. Choice `index` counts over the call's prompts and their `n`
completions, prompt by prompt, as OpenAI numbers them. Streamed outputs are DELTA ones:
each holds only what is new, so the builder adds their token counts up for the usage.
Tokens a tool forced were not sampled: their log-prob entries are null. Log-prob entries
name tokens as TokenCodec.token_text does, so that distinct tokens never share a key.
"""

import time
import uuid

from ..outputs import CompletionOutput, Logprob, RequestOutput
from .protocol import ResponseShape
from .tokenization import JSON_LOGPROB_FLOOR, TokenCodec

LogprobEntry = dict[int, Logprob] | None


class Responses:
    """What completions and chat share: ids, usage, the choice numbering; subclasses shape the choices."""
    id_prefix = object_name = chunk_object_name = ""

    def __init__(self, model: str, n: int, shape: ResponseShape, codec: TokenCodec):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.n, self.shape, self.codec = model, n, shape, codec
        self.prompt_tokens = self.completion_tokens = 0
        self._prompts_counted: set[int] = set()
        self._opened: set[int] = set()  # choices whose first part (echo, prompt log-probs) has gone out

    def body(self, outputs: list[RequestOutput]) -> dict:
        """The whole answer to a call that did not stream: one finished output per prompt."""
        choices = []
        for prompt_index, output in enumerate(outputs):
            self._count(prompt_index, output)
            choices += [self._choice(prompt_index, c, output, self.choice) for c in output.outputs]
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        """Stream chunks for what a DELTA output adds: one per completion with news."""
        self._count(prompt_index, output)
        return [self._chunk([self._choice(prompt_index, c, output, self.chunk_choice)])
                for c in output.outputs if c.token_ids or c.text or c.finish_reason]

    def first_chunks(self, num_prompts: int) -> list[dict]:
        return []

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def choice(self, index: int, completion: CompletionOutput, prompt: RequestOutput | None) -> dict:
        """`prompt` is the output whose prompt opens this choice (echo), or None after its first part."""
        raise NotImplementedError

    def chunk_choice(self, index: int, completion: CompletionOutput, prompt: RequestOutput | None) -> dict:
        raise NotImplementedError

    def _choice(self, prompt_index: int, completion: CompletionOutput, output: RequestOutput, build) -> dict:
        index = prompt_index * self.n + completion.index
        first = index not in self._opened
        self._opened.add(index)
        choice = build(index, self._generated(completion), output if first else None)
        if first and self.shape.prompt_logprobs:
            choice["prompt_logprobs"] = [None if e is None else self._prompt_entry(e) for e in output.prompt_logprobs]
        return choice

    def _generated(self, completion: CompletionOutput) -> CompletionOutput:
        """The completion as the client sees it: with max_tokens=0, the token run to score the
        prompt is dropped."""
        if not self.shape.prompt_only:
            return completion
        return CompletionOutput(completion.index, "", [], None, [] if completion.logprobs is not None else None,
                                completion.finish_reason, completion.stop_reason)

    def _prompt_entry(self, entry: dict[int, Logprob]) -> dict:
        """vLLM's form of a prompt token's entry: keyed by token id."""
        return {str(t): {"logprob": max(lp.logprob, JSON_LOGPROB_FLOOR), "rank": lp.rank,
                         "decoded_token": self._name(t)} for t, lp in entry.items()}

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.chunk_object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def _count(self, prompt_index: int, output: RequestOutput) -> None:
        if prompt_index not in self._prompts_counted:
            self._prompts_counted.add(prompt_index)
            self.prompt_tokens += len(output.prompt_token_ids) * self.n  # each completion reads it
        if not self.shape.prompt_only:
            self.completion_tokens += sum(len(c.token_ids) for c in output.outputs)

    def _name(self, token: int) -> str:
        return self.codec.token_text(token, self.shape.tokens_as_ids)

    @staticmethod
    def _logprob(token: int, entry: LogprobEntry) -> float | None:
        return None if not entry else max(entry[token].logprob, JSON_LOGPROB_FLOOR)

    def _top(self, token: int | None, entry: LogprobEntry) -> list[tuple[int, float]]:
        """An entry's `logprobs` most likely tokens, most likely first, and `token` where it is not among them."""
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)
        return [(t, max(lp.logprob, JSON_LOGPROB_FLOOR)) for t, lp in ranked
                if lp.rank <= self.shape.logprobs or t == token]


class CompletionResponses(Responses):
    id_prefix, object_name, chunk_object_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str, n: int, shape: ResponseShape, codec: TokenCodec,
                 prompt_texts: list[str | None]):
        super().__init__(model, n, shape, codec)
        self.prompt_texts = prompt_texts
        self._text_offsets: dict[int, int] = {}  # per choice: characters of token names sent so far

    def choice(self, index: int, completion: CompletionOutput, prompt: RequestOutput | None) -> dict:
        text, token_ids, entries = completion.text, completion.token_ids, completion.logprobs
        if prompt is not None and self.shape.echo:
            given = self.prompt_texts[index // self.n]
            text = (self.codec.tokenizer.decode(prompt.prompt_token_ids, skip_special_tokens=False)
                    if given is None else given) + text
            token_ids = prompt.prompt_token_ids + token_ids
            if entries is not None:
                entries = prompt.prompt_logprobs + entries
        return {"index": index, "text": text, "logprobs": self._logprobs(index, token_ids, entries),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    chunk_choice = choice

    def _logprobs(self, index: int, token_ids: list[int], entries: list[LogprobEntry] | None) -> dict | None:
        """The legacy completions form: parallel lists over the tokens; each top_logprobs
        holds the sampled (or prompt) token too, as vLLM's does."""
        if self.shape.logprobs is None:
            return None
        entries = entries or [None] * len(token_ids)
        tokens = [self._name(t) for t in token_ids]
        offsets, offset = [], self._text_offsets.get(index, 0)
        for name in tokens:
            offsets.append(offset)
            offset += len(name)
        self._text_offsets[index] = offset
        return {"tokens": tokens,
                "token_logprobs": [self._logprob(t, e) for t, e in zip(token_ids, entries)],
                "top_logprobs": [{self._name(top): lp for top, lp in self._top(t, e)} if e else None
                                 for t, e in zip(token_ids, entries)],
                "text_offset": offsets}


class ChatResponses(Responses):
    id_prefix, object_name, chunk_object_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, completion: CompletionOutput, prompt: RequestOutput | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self._logprobs(completion), "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def chunk_choice(self, index: int, completion: CompletionOutput, prompt: RequestOutput | None) -> dict:
        return {"index": index, "delta": {"content": completion.text}, "logprobs": self._logprobs(completion),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    def first_chunks(self, num_prompts: int) -> list[dict]:
        """A stream opens each choice with the assistant's role, as OpenAI's does."""
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(num_prompts * self.n)]

    def _logprobs(self, completion: CompletionOutput) -> dict | None:
        """OpenAI's chat form: top_logprobs are the k most likely tokens, as OpenAI's are."""
        if self.shape.logprobs is None:
            return None
        entries = completion.logprobs or [None] * len(completion.token_ids)
        return {"content": [{**self._token(token, self._logprob(token, entry)),
                             "top_logprobs": [self._token(t, lp) for t, lp in self._top(None, entry)] if entry else []}
                            for token, entry in zip(completion.token_ids, entries)]}

    def _token(self, token: int, logprob: float | None) -> dict:
        return {"token": self._name(token), "logprob": logprob, "bytes": list(self.codec.token_bytes(token))}
