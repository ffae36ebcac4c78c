"""nanochat's tokenizer (a pickled tiktoken Encoding, or a tokenizer.json) and its chat format.

`tokenizer.pkl` is read with an unpickler that can rebuild a tiktoken Encoding and
nothing else, so a planted pickle cannot run code. The Encoding is built from the
ranks the file holds; a pickle that only names one of tiktoken's registry encodings
(which tiktoken would download) is refused.
A dir without one may hold the transformers form, `tokenizer.json` (see
tokenizer_json.py).
"""

import os
import pickle
from pathlib import Path

import tiktoken

from . import unsupported
from .tokenizer_json import TokenizerJson
from .validation import check_bool

SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                  "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                  "<|output_start|>", "<|output_end|>")


class _PickledEncoding:
    """Stands in for tiktoken.Encoding while unpickling and keeps the state it is given:
    tiktoken's own __setstate__ would fetch a registry encoding named by a str state."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _PickledEncoding
        raise pickle.UnpicklingError(
            f"tokenizer.pkl refers to {module}.{name}; only tiktoken.core.Encoding is allowed")


def _build_encoding(pickled, pkl: Path) -> tiktoken.Encoding:
    if not isinstance(pickled, _PickledEncoding):
        raise ValueError(f"{pkl} holds a {type(pickled).__name__}, not a tiktoken Encoding")
    state = getattr(pickled, "state", None)
    if isinstance(state, str):
        raise ValueError(f"{pkl} only names tiktoken's registry encoding {state!r} instead of holding "
                         "its ranks; nanochat's tokenizer.pkl holds them (no download is attempted)")
    keys = ("name", "pat_str", "mergeable_ranks", "special_tokens")
    if not isinstance(state, dict) or set(state) - {*keys, "explicit_n_vocab"} or not set(keys) <= set(state):
        raise ValueError(f"{pkl} is not a pickled tiktoken Encoding: its state is not {keys}")
    try:
        return tiktoken.Encoding(**state)
    except Exception as e:
        raise ValueError(f"{pkl} holds a malformed tiktoken Encoding: {e}") from None


def tokenizer_search_paths(model_dir: str | Path) -> list[Path]:
    """Where a tokenizer is looked for, in order, when none is given."""
    model_dir = Path(model_dir)
    base_dir = os.environ.get("NANOCHAT_BASE_DIR")
    paths = [model_dir, model_dir / "tokenizer", model_dir.parent / "tokenizer"]
    if base_dir:
        paths.append(Path(base_dir) / "tokenizer")
    paths.append(Path.home() / ".cache" / "nanochat" / "tokenizer")
    return paths


TOKENIZER_FILES = ("tokenizer.pkl", "tokenizer.json")
CHAT_TEMPLATE_PARAMS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message")


def message_text(content, where: str) -> str:
    """A message's content as text: a str, or OpenAI's list of content parts, whose text
    parts are joined by newlines as vLLM joins them. nanochat models read text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where}'s content must be a str or a list of {{'type': 'text', 'text': str}} "
                        f"parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            got = f"type {kind!r}" if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{where}'s content part {j} must be a {{'type': 'text', 'text': str}} dict "
                             f"(nanochat models read text only), got {got}")
        texts.append(part["text"])
    return "\n".join(texts)


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding | TokenizerJson):
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        missing = [t for t in SPECIAL_TOKENS if t not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"tokenizer lacks nanochat's special tokens {missing}")
        self.special = {t: encoding.encode_single_token(t) for t in SPECIAL_TOKENS}
        self.special_ids = frozenset(self.special.values())
        self.bos_id = self.special["<|bos|>"]
        # nanochat stops a reply at <|assistant_end|>, and a base model's text at <|bos|>
        self.eos_token_ids = frozenset({self.special["<|assistant_end|>"], self.bos_id})

    def same_tokens_as(self, other: "Tokenizer") -> bool:
        """Whether every token id means the same bytes (or special token) in both, so that
        token ids pass from one model to the other unchanged."""
        if self.vocab_size != other.vocab_size or self.special != other.special:
            return False
        byte_tokens = [i for i in range(self.vocab_size) if i not in self.special_ids]
        return all(map(bytes.__eq__, map(self.encoding.decode_single_token_bytes, byte_tokens),
                       map(other.encoding.decode_single_token_bytes, byte_tokens)))

    # transformers' names, which vLLM code reads from get_tokenizer()
    @property
    def bos_token_id(self) -> int:
        """<|bos|>, which starts every document and conversation."""
        return self.bos_id

    @property
    def eos_token_id(self) -> int:
        """<|assistant_end|>, the end of a chat reply, as the converted transformers
        config names it first. Generation also stops at <|bos|> (a base model's next
        document): eos_token_ids holds both."""
        return self.special["<|assistant_end|>"]

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        pkl = Path(path) / "tokenizer.pkl"
        if Path(path).is_file():
            raise ValueError(f"tokenizer={str(path)!r} is a file; pass the dir that holds tokenizer.pkl")
        if not pkl.is_file():
            if (Path(path) / "tokenizer.json").is_file():
                return cls(TokenizerJson(Path(path) / "tokenizer.json"))
            raise FileNotFoundError(f"no tokenizer.pkl or tokenizer.json in {path}")
        with open(pkl, "rb") as f:
            try:
                pickled = _EncodingUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise ValueError(f"{pkl} is not a nanochat tokenizer: {e}") from None
            except Exception as e:
                raise ValueError(f"{pkl} is corrupt or not a pickled tiktoken Encoding: {e}") from None
        return cls(_build_encoding(pickled, pkl))

    @classmethod
    def find(cls, model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> "Tokenizer":
        if tokenizer_dir is not None:
            return cls.from_dir(tokenizer_dir)
        searched = tokenizer_search_paths(model_dir)
        for path in searched:
            if any((path / name).is_file() for name in TOKENIZER_FILES):
                return cls.from_dir(path)
        raise FileNotFoundError(
            "no tokenizer.pkl or tokenizer.json found; looked in " + ", ".join(map(str, searched))
            + ". Pass tokenizer=DIR or set NANOCHAT_BASE_DIR.")

    def encode(self, text: str, prepend_bos: bool = True, *, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of text, <|bos|> first unless prepend_bos=False (nanochat's own encode
        prepends nothing by default: a single token's id is encode(t, prepend_bos=False)[0]).
        add_special_tokens is transformers' name for prepend_bos: <|bos|> is the only
        special token a text gets."""
        if add_special_tokens is not None:
            if check_bool("add_special_tokens", add_special_tokens) and not prepend_bos:
                raise ValueError("prepend_bos=False and add_special_tokens=True disagree: add_special_tokens "
                                 "is transformers' name for prepend_bos; pass one of them")
            prepend_bos = add_special_tokens
        # special-token text inside user strings stays plain text, as in nanochat
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_id] + ids if prepend_bos else ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        """transformers' `tokenizer(text)`: {"input_ids", "attention_mask"}, <|bos|> first
        unless add_special_tokens=False; a list of texts gives lists of both."""
        if isinstance(text, (list, tuple)):
            ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in text]
            return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            token_ids = [t for t in token_ids if t not in self.special_ids]
        return self.encoding.decode(token_ids, errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
        """Token ids of a conversation in nanochat's chat format.

        By default it ends with <|assistant_start|> to prompt a reply, so the last
        message must be the user's. add_generation_prompt=False renders the turns as
        they are, each closed; continue_final_message=True (with add_generation_prompt
        False) leaves the last, assistant, message open for the model to go on with it.
        """
        if not messages:
            raise ValueError("a conversation needs at least one message")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt=True starts a new reply and continue_final_message=True "
                             "continues the last one: set at most one of them")
        messages = [{"role": m.get("role"), "content": message_text(m.get("content"), f"message {i}")}
                    for i, m in enumerate(messages)]
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            # nanochat has no system role: it prefixes the first user message instead
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{"role": "user", "content": merged}] + messages[2:]
        ids = [self.bos_id]
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i} must be a {expected!r} message "
                                 f"(turns alternate user/assistant), got role={role!r}")
            ids.append(self.special[f"<|{role}_start|>"])
            ids += self.encoding.encode_ordinary(content)
            ids.append(self.special[f"<|{role}_end|>"])
        if add_generation_prompt:
            if messages[-1]["role"] != "user":
                raise ValueError("a conversation must end with a user message to prompt a reply (to continue "
                                 "its last reply instead: add_generation_prompt=False, continue_final_message=True)")
            ids.append(self.special["<|assistant_start|>"])
        elif continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise ValueError("continue_final_message=True continues an assistant message, but the "
                                 "conversation ends with a user message")
            ids.pop()  # its <|assistant_end|>
        return ids

    def apply_chat_template(self, conversation, tokenize: bool = True, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, **hf_only):
        """transformers' apply_chat_template, over render_chat: token ids, or with
        tokenize=False the rendered text (special tokens as text). Its defaults are
        transformers' (no generation prompt; LLM.chat adds one). A list of conversations
        gives a list of results. nanochat's chat format is fixed: a chat_template, tools
        and transformers' other arguments are refused unless they hold their defaults.
        """
        unsupported.check_arguments("apply_chat_template", hf_only, CHAT_TEMPLATE_PARAMS,
                                    unsupported.CHAT_TEMPLATE_ARGS)
        if conversation and isinstance(conversation[0], (list, tuple)):
            return [self.apply_chat_template(c, tokenize, add_generation_prompt, continue_final_message)
                    for c in conversation]
        ids = self.render_chat(conversation, add_generation_prompt, continue_final_message)
        return ids if tokenize else self.decode(ids, skip_special_tokens=False)
