"""nanochat's tokenizer as a `tokenizer.json` (the transformers format), both ways.

A transformers nanochat model ships its tokenizer as a byte-level BPE in
`tokenizer.json`: the split regex as a pre-tokenizer, each token written as a string
of stand-in characters (one per byte, GPT-2's byte alphabet), merges in rank order,
the special tokens as added tokens, and (as we write it) a post-processor that puts
<|bos|> first. `TokenizerJson` reads one through the `tokenizers` library and offers
the slice of `tiktoken.Encoding` that `Tokenizer` uses; `write_tokenizer_json` and
`encoding_from_tokenizer_json` convert between it and nanochat's tiktoken `Encoding`
(ids are tiktoken ranks, so both forms encode alike).
"""

import json
from pathlib import Path

import tiktoken

from .extras import import_hf


def _byte_alphabet() -> dict[int, str]:
    """byte -> the character that stands for it in byte-level BPE token strings.

    Printable Latin-1 bytes stand for themselves; the other 68 (space, controls, ...)
    move to code points 256.. in byte order, so that no token string holds whitespace.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + i) for i, b in enumerate(others)})
    return alphabet


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class TokenizerJson:
    """A tokenizer.json behind the part of tiktoken.Encoding's interface Tokenizer uses."""

    def __init__(self, path: str | Path):
        tokenizers = import_hf("tokenizers")
        self.path = Path(path)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
        # nanochat encodes user text as plain text: special-token strings in it stay text
        self._tokenizer.encode_special_tokens = True
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens_set = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()
                                   if t.special}

    def encode_single_token(self, text: str) -> int:
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            raise KeyError(text)
        return token_id

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids, errors: str = "replace") -> str:
        # the byte-level decoder already replaces invalid UTF-8, as errors="replace" asks
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        """A plain token's bytes (what structured outputs match against)."""
        return bytes(CHAR_TO_BYTE[c] for c in self._tokenizer.id_to_token(token_id))


def _token_string(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def write_tokenizer_json(encoding: tiktoken.Encoding, directory: str | Path) -> None:
    """Write `encoding` as tokenizer.json and tokenizer_config.json in `directory` (made if missing).

    A transformers tokenizer opened from the dir encodes text as microvllm's text prompts
    are encoded: <|bos|> first (add_special_tokens=False leaves it out), special-token
    text kept as text."""
    tokenizers = import_hf("tokenizers")
    special = {t: encoding.encode_single_token(t) for t in encoding.special_tokens_set}
    special_ids = set(special.values())
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab) if i not in special_ids}
    # A token merges from any split into two tokens; ordering merges by the rank of
    # their result makes BPE merge in tiktoken's order (lowest resulting rank first).
    merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    bpe = tokenizers.models.BPE(vocab={_token_string(t): r for t, r in ranks.items()},
                                merges=[(_token_string(a), _token_string(b)) for *_, a, b in merges],
                                ignore_merges=True)  # a piece that is a token stays whole, as in tiktoken
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(encoding._pat_str), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    for token in sorted(special, key=special.get):  # added tokens take the next free ids
        tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        if tokenizer.token_to_id(token) != special[token]:
            raise ValueError(f"special token {token} has id {special[token]}, which tokenizer.json "
                             "cannot give it: special tokens must follow the other tokens")
    if "<|bos|>" in special:  # every text starts a document, as microvllm's text prompts do
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|>:1 $B:1", special_tokens=[("<|bos|>", special["<|bos|>"])])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    # enough for transformers' AutoTokenizer to open the dir; it reads special-token names
    # in text as those tokens, as the server does with text prompts (vLLM's rule)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if "<|bos|>" in special:
        config["bos_token"] = "<|bos|>"
    if "<|assistant_end|>" in special:
        config["eos_token"] = "<|assistant_end|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encoding_from_tokenizer_json(path: str | Path) -> tiktoken.Encoding:
    """The tiktoken Encoding of a byte-level BPE tokenizer.json whose ids are merge ranks."""
    path = Path(path)
    spec = json.loads(path.read_text())
    model, pre_tokenizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    splits = [p for p in pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if p.get("type") == "Split"]
    pattern = splits[0]["pattern"] if splits else {}
    pat_str = pattern.get("Regex") or pattern.get("String")
    if model.get("type") != "BPE" or pat_str is None:
        raise ValueError(f"{path} is not a byte-level BPE with a split regex, so it has no tiktoken form")
    try:
        ranks = {bytes(CHAR_TO_BYTE[c] for c in token): rank for token, rank in model["vocab"].items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocab token character {e} is not in the byte-level alphabet") from None
    merged_ranks = [model["vocab"].get("".join(m) if isinstance(m, list) else m.replace(" ", ""))
                    for m in model.get("merges", [])]
    if None in merged_ranks or merged_ranks != sorted(merged_ranks):
        raise ValueError(f"{path}: merges are not in the order of their tokens' ids, "
                         "so the ids are not BPE ranks and tiktoken cannot reproduce it")
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    return tiktoken.Encoding(name=path.parent.name or "tokenizer", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens=special)
