"""Text and tokens as the server reads and writes them: its text prompts' encoding, the
text of a token in log-prob entries, and /tokenizer_info's body (vLLM's routes, with
/tokenize and /detokenize, which lm-evaluation-harness probes).

A text prompt is read as vLLM's server reads it with a transformers tokenizer: <|bos|>
first (`add_special_tokens`, on by default), and the names of nanochat's special tokens
inside the text become those tokens. (`LLM.generate` keeps such names plain text, as
nanochat does for user text; a completions client owns its whole prompt anyway.)
/tokenize encodes the same way, so a client can count and cut what the server will run.
"""

import re

from ..tokenizer import Tokenizer

JSON_LOGPROB_FLOOR = -9999.0  # -inf is not JSON: OpenAI and vLLM send this instead


class TokenCodec:
    """One per server: the tokenizer, with its special-token pattern compiled and each
    token's text kept once rendered."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._special = re.compile("(" + "|".join(map(re.escape, tokenizer.special)) + ")")
        self._texts: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.tokenizer.bos_id] if add_special_tokens else []
        # re.split with a group: plain text at even places, special-token names at odd ones
        for i, part in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self.tokenizer.special[part])
            elif part:
                ids += self.tokenizer.encode(part, prepend_bos=False)
        return ids

    def token_text(self, token_id: int, as_token_id: bool = False) -> str:
        """A token as log-prob entries name it: its text, or, where its bytes are not whole
        UTF-8 characters (one byte of a multi-byte one), "bytes:\\xNN..." as OpenAI and vLLM
        write them, so that no two tokens share a name; "token_id:N" if the client asked."""
        if as_token_id:
            return f"token_id:{token_id}"
        text = self._texts.get(token_id)
        if text is None:
            raw = self.token_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.tokenizer.special_ids:
            return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return self.tokenizer.encoding.decode_single_token_bytes(token_id)


def tokenizer_info(codec: TokenCodec, max_model_len: int) -> dict:
    """GET /tokenizer_info: the fields of a tokenizer_config.json that clients read.
    lm-evaluation-harness finds the ids by tokenizing these names, and starts
    loglikelihood_rolling windows with bos_token's."""
    tokenizer = codec.tokenizer
    return {"tokenizer_class": "NanochatTokenizer", "bos_token": codec.token_text(tokenizer.bos_token_id),
            "eos_token": codec.token_text(tokenizer.eos_token_id), "pad_token": None,
            "add_bos_token": True, "vocab_size": tokenizer.vocab_size, "model_max_length": max_model_len,
            "additional_special_tokens": sorted(tokenizer.special, key=tokenizer.special.get)}

