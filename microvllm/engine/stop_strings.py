"""StopStrings: SamplingParams.stop as a request feature.

The output processor decodes the output of a sequence that watches stop strings at
every sampled token and asks `stop` whether the text now holds one; the text, cut
after a stop string, is kept here, and is the output's text once a stop string ended it.
"""

from .request_feature import RequestFeature, TokenUpdate
from .sequence import Sequence


class StopStrings(RequestFeature):
    every_token = True
    watches_text = True

    def __init__(self):
        self.texts: dict[Sequence, str] = {}  # the output decoded so far, by sequence

    def stop(self, seq: Sequence, text: str) -> tuple[str, str] | None:
        """(the first stop string that ends in the text this token added, the text cut there)."""
        p = seq.params
        # what was searched before cannot hold a stop string, except where a trailing
        # partial UTF-8 character (decoded as U+FFFD) has now become a real one
        searched = len(self.texts.get(seq, "").rstrip("\ufffd"))
        hits = [(i, s) for s in p.stop_strings if (i := text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        return stop, text[:index + len(stop)] if p.include_stop_str_in_output else text[:index]

    def commit(self, seq: Sequence, update: TokenUpdate) -> None:
        self.texts[seq] = update.text

    def output_text(self, seq: Sequence) -> str | None:
        # where a stop string ended the sequence, the kept text is cut there
        if seq.finish_reason == "stop" and isinstance(seq.stop_reason, str):
            return self.texts[seq]
        return None
