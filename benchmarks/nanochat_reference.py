"""nanochat's own Engine, imported from a nanochat checkout, for side-by-side checks.

Nothing of nanochat ships with microvllm: the caller names a checkout (a clone of
karpathy/nanochat whose dependencies are installed), and its `nanochat` package is
imported from there. The model is built by nanochat's own checkpoint loader from a
checkpoint dir that holds its tokenizer in `tokenizer/` (as benchmarks.random_checkpoint
writes them), so both engines read the same files.
"""

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def import_nanochat(src: str | Path):
    """nanochat's engine module from the checkout at `src`; ImportError says why not."""
    src = Path(src).expanduser().resolve()
    if not (src / "nanochat" / "engine.py").is_file():
        raise ImportError(f"{src} is not a nanochat checkout: it has no nanochat/engine.py")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    return importlib.import_module("nanochat.engine")


@contextlib.contextmanager
def _base_dir(directory: Path) -> Iterator[None]:
    # nanochat's loader reads the tokenizer from $NANOCHAT_BASE_DIR/tokenizer
    before = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(directory)
    try:
        yield
    finally:
        if before is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = before


def nanochat_engine(src: str | Path, checkpoint_dir: str | Path):
    """nanochat's Engine over the largest step in `checkpoint_dir`, on the CPU, as its
    scripts build it (model in eval mode, its RustBPETokenizer)."""
    import torch
    engine_module = import_nanochat(src)
    from nanochat.checkpoint_manager import build_model
    checkpoint_dir = Path(checkpoint_dir)
    step = max(int(p.stem.split("_")[1]) for p in checkpoint_dir.glob("meta_*.json"))
    with _base_dir(checkpoint_dir):
        model, tokenizer, _ = build_model(str(checkpoint_dir), step, torch.device("cpu"), "eval")
    return engine_module.Engine(model, tokenizer)
