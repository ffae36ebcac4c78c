"""Convert a nanochat model between nanochat's own format and the transformers format.

    python -m microvllm.convert SRC OUT [--step N] [--tokenizer DIR] [--dtype bfloat16]

SRC is any form `LLM(model=...)` takes (a dir, a nanochat SOURCE[:TAG], a hub id).
A nanochat checkpoint becomes a transformers `NanoChatForCausalLM` dir (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), which transformers and
vLLM can open; a transformers dir becomes a nanochat checkpoint dir (model_<step>.pt,
meta_<step>.json, tokenizer/tokenizer.pkl), which nanochat can open. Only era-A
checkpoints (nanochat's original GPT, the one transformers implements) convert to the
transformers format. The conversion is exact: the weights are the same tensors.
"""

import argparse
import json
import pickle
import shutil
import sys
from pathlib import Path

import torch

from .engine.config import DTYPES
from .model import hf_format
from .model.loader import build_model_config, find_checkpoint, read_model_config_dict, read_state_dict
from .model.sources import detect_format, resolve_model_dir
from .tokenizer import Tokenizer
from .tokenizer_json import TokenizerJson, encoding_from_tokenizer_json, write_tokenizer_json


def _check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}: wrong tokenizer for this checkpoint")


def nanochat_to_transformers(model: str | Path, out_dir: str | Path, step: int | None = None,
                             tokenizer: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the era-A nanochat checkpoint `model` as a transformers dir; `dtype` None keeps the stored one."""
    model_dir, out_dir = resolve_model_dir(model, step=step), Path(out_dir)
    model_path, meta_path, _ = find_checkpoint(model_dir, step)
    state_dict = read_state_dict(model_path)
    config = build_model_config(read_model_config_dict(meta_path), state_dict, logit_softcap=None)
    tok = Tokenizer.find(model_dir, tokenizer)
    _check_vocab(tok, config.vocab_size)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    eos = sorted(tok.eos_token_ids, key=lambda t: t != tok.special["<|assistant_end|>"])  # the chat EOS first
    hf_format.write_checkpoint(out_dir, config, state_dict, tok.bos_id, eos)
    if isinstance(tok.encoding, TokenizerJson):
        shutil.copy(tok.encoding.path, out_dir / "tokenizer.json")
    else:
        write_tokenizer_json(tok.encoding, out_dir)
    return out_dir


def transformers_to_nanochat(model: str | Path, out_dir: str | Path, step: int = 0,
                             tokenizer: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the transformers NanoChat dir `model` as nanochat checkpoint `step` in `out_dir`."""
    model_dir, out_dir = resolve_model_dir(model), Path(out_dir)
    tok = Tokenizer.find(model_dir, tokenizer)
    config, state_dict = hf_format.read_checkpoint(model_dir, tok.vocab_size)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    encoding = (encoding_from_tokenizer_json(tok.encoding.path) if isinstance(tok.encoding, TokenizerJson)
                else tok.encoding)
    (out_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(encoding, f)
    torch.save(state_dict, out_dir / f"model_{step:06d}.pt")
    model_config = {k: getattr(config, k) for k in
                    ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")}
    # written last: nanochat and our loader take a meta file to mean the step is complete
    (out_dir / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": model_config}))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="model to convert: a dir, a nanochat SOURCE[:TAG] or a hub id")
    parser.add_argument("out", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--step", type=int, help="nanochat step: the one to read (default: the largest), "
                                                 "or the one to write (default: 0)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: searched as LLM does)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep them)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if detect_format(resolve_model_dir(args.src, step=args.step), args.step) == "nanochat":
            out = nanochat_to_transformers(args.src, args.out, args.step, args.tokenizer, dtype)
            print(f"wrote a transformers NanoChatForCausalLM dir: {out}")
        else:
            out = transformers_to_nanochat(args.src, args.out, args.step or 0, args.tokenizer, dtype)
            print(f"wrote a nanochat checkpoint dir: {out}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
