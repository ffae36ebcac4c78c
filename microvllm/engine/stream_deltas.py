"""StreamDeltas: a DELTA stream (RequestOutputKind.DELTA) as a request feature.

Each output of the request carries only what is new since the last one. Per sequence
it keeps how much has been sent, and the leading output tokens whose text ends on a
whole character and has all been sent (settled): each output decodes only the tokens
after them, so a stream's text costs time linear in its length, not quadratic.
"""

from dataclasses import dataclass
from typing import Callable

from .request_feature import RequestFeature
from .sequence import Sequence


@dataclass
class StreamCursor:
    num_streamed_tokens: int = 0        # of the output, sent so far
    num_streamed_chars: int = 0
    num_settled_tokens: int = 0
    num_settled_chars: int = 0


class StreamDeltas(RequestFeature):
    def __init__(self):
        self.cursors: dict[Sequence, StreamCursor] = {}

    def take(self, seq: Sequence, whole_text: str | None, decode: Callable[[list[int]], str]) -> tuple[str, int]:
        """(the text not sent yet, how many output tokens were sent before); marks it all
        sent. `whole_text`: the output's text where a feature decided it, else None:
        `decode` gives the text of output tokens. A trailing partial UTF-8 character
        waits until it is whole, unless the sequence has finished."""
        cursor = self.cursors.get(seq)
        if cursor is None:
            cursor = self.cursors[seq] = StreamCursor()
        tokens, start, sent_tokens = seq.token_ids, seq.num_prompt_tokens, cursor.num_streamed_tokens
        if whole_text is not None:
            offset, text = 0, whole_text
        else:  # the text after the settled characters
            offset = cursor.num_settled_chars
            text = decode(tokens[start + cursor.num_settled_tokens:])
            if not seq.is_finished and text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            else:  # all of it goes out now
                cursor.num_settled_tokens, cursor.num_settled_chars = len(tokens) - start, offset + len(text)
        new_text = text[cursor.num_streamed_chars - offset:]
        cursor.num_streamed_tokens = len(tokens) - start
        cursor.num_streamed_chars = max(offset + len(text), cursor.num_streamed_chars)
        return new_text, sent_tokens
