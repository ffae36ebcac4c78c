"""OpenAI's response bodies and stream chunks, built from the engine's RequestOutputs.

One builder per HTTP call. Choice `index` counts over the call's prompts and their `n`
completions, prompt by prompt, as OpenAI numbers them. Streamed outputs are DELTA ones:
each holds only what is new, so the builder adds their token counts up for the usage.
Tokens a tool forced (nanochat's calculator answers) were not sampled: their log-prob
entries are null.
"""

import time
import uuid

from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..tokenizer import Tokenizer


class Responses:
    """What completions and chat share: ids, usage, the choice numbering; subclasses shape the choices."""
    id_prefix = object_name = chunk_object_name = ""

    def __init__(self, model: str, n: int, top_logprobs: int | None, tokenizer: Tokenizer):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.n, self.top_logprobs, self.tokenizer = model, n, top_logprobs, tokenizer
        self.prompt_tokens = self.completion_tokens = 0
        self._prompts_counted: set[int] = set()

    def body(self, outputs: list[RequestOutput]) -> dict:
        """The whole answer to a call that did not stream: one finished output per prompt."""
        choices = []
        for prompt_index, output in enumerate(outputs):
            self._count(prompt_index, output)
            choices += [self.choice(self._index(prompt_index, c), c) for c in output.outputs]
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        """Stream chunks for what a DELTA output adds: one per completion with news."""
        self._count(prompt_index, output)
        return [self._chunk([self.chunk_choice(self._index(prompt_index, c), c)])
                for c in output.outputs if c.token_ids or c.text or c.finish_reason]

    def first_chunks(self, num_prompts: int) -> list[dict]:
        return []

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        raise NotImplementedError

    def chunk_choice(self, index: int, completion: CompletionOutput) -> dict:
        raise NotImplementedError

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.chunk_object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def _index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def _count(self, prompt_index: int, output: RequestOutput) -> None:
        if prompt_index not in self._prompts_counted:
            self._prompts_counted.add(prompt_index)
            self.prompt_tokens += len(output.prompt_token_ids) * self.n  # each completion reads it
        self.completion_tokens += sum(len(c.token_ids) for c in output.outputs)

    def _token_text(self, token: int, entry: dict[int, Logprob] | None) -> str:
        return entry[token].decoded_token if entry else self.tokenizer.decode([token], skip_special_tokens=False)

    def _top(self, entry: dict[int, Logprob] | None) -> list[tuple[str, float]]:
        """The top_logprobs most likely tokens of an entry, most likely first."""
        if not entry:
            return []
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        return [(lp.decoded_token, lp.logprob) for lp in ranked if lp.rank <= self.top_logprobs]


class CompletionResponses(Responses):
    id_prefix, object_name, chunk_object_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self._text_offsets: dict[int, int] = {}  # per choice: characters sent so far

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        return {"index": index, "text": completion.text, "logprobs": self._logprobs(index, completion),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    chunk_choice = choice

    def _logprobs(self, index: int, completion: CompletionOutput) -> dict | None:
        """The legacy completions form: parallel lists over the tokens."""
        if self.top_logprobs is None:
            return None
        entries = completion.logprobs or [None] * len(completion.token_ids)
        tokens = [self._token_text(t, e) for t, e in zip(completion.token_ids, entries)]
        offsets, offset = [], self._text_offsets.get(index, 0)
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return {"tokens": tokens,
                "token_logprobs": [e[t].logprob if e else None for t, e in zip(completion.token_ids, entries)],
                "top_logprobs": [dict(self._top(e)) if e else None for e in entries],
                "text_offset": offsets}


class ChatResponses(Responses):
    id_prefix, object_name, chunk_object_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self._logprobs(completion), "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def chunk_choice(self, index: int, completion: CompletionOutput) -> dict:
        return {"index": index, "delta": {"content": completion.text}, "logprobs": self._logprobs(completion),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    def first_chunks(self, num_prompts: int) -> list[dict]:
        """A stream opens each choice with the assistant's role, as OpenAI's does."""
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(num_prompts * self.n)]

    def _logprobs(self, completion: CompletionOutput) -> dict | None:
        if self.top_logprobs is None:
            return None
        entries = completion.logprobs or [None] * len(completion.token_ids)
        content = []
        for token, entry in zip(completion.token_ids, entries):
            text = self._token_text(token, entry)
            content.append({"token": text, "logprob": entry[token].logprob if entry else None,
                            "bytes": list(text.encode()),
                            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                             for t, lp in self._top(entry)]})
        return {"content": content}
