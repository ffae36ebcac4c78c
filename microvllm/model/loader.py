"""Loading nanochat checkpoints: find the files, detect the era, build the GPT.

A checkpoint dir holds `model_{step:06d}.pt` (a state dict) and `meta_{step:06d}.json`
(with `model_config`), possibly for several steps. Weights are read with
`weights_only=True`, so a checkpoint file cannot run code.
"""

import json
import os
import re
from pathlib import Path

import torch

from .config import ModelConfig
from .gpt import GPT

# keys of short-lived nanochat prototypes whose forward math was never released
PROTOTYPE_KEY_MARKERS = ("v0_lambdas", "value_embed_A", "value_embed.", "bigram")
REQUIRED_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# set to 1 to run past the trained length anyway (vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN)
ALLOW_LONG_MAX_MODEL_LEN = "MICROVLLM_ALLOW_LONG_MAX_MODEL_LEN"
COMPILE_PREFIX = "_orig_mod."


def find_checkpoint(model_dir: str | Path, step: int | None = None) -> tuple[Path, Path, int]:
    """(model path, meta path, step); the largest step unless `step` is given."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise ValueError(f"model={str(model_dir)!r} is a file; pass the checkpoint dir that holds it "
                         f"({model_dir.parent}), and step=N to pick one of its model_<step>.pt files")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint dir {model_dir} does not exist")
    steps = sorted(int(m.group(1)) for p in model_dir.iterdir()
                   if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
    if not steps:
        raise FileNotFoundError(f"no model_<step>.pt file in {model_dir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step={step} has no checkpoint in {model_dir}; available steps: {steps}")
    model_path = model_dir / f"model_{step:06d}.pt"
    meta_path = model_dir / f"meta_{step:06d}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path.name} is missing beside {model_path.name} in {model_dir}")
    return model_path, meta_path, step


def read_model_config_dict(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
        config = meta["model_config"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    except (KeyError, TypeError):
        raise ValueError(f"{meta_path} has no 'model_config' object") from None
    if not isinstance(config, dict):
        raise ValueError(f"{meta_path}: model_config must be an object, got {type(config).__name__}")
    missing = [k for k in REQUIRED_CONFIG_FIELDS if k not in config]
    if missing:
        raise ValueError(f"{meta_path}: model_config lacks the fields {missing}")
    return config


def read_state_dict(model_path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{model_path} is not a loadable weights-only state dict: {e}") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{model_path} holds a {type(state_dict).__name__}, not a state dict")
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise ValueError(f"{model_path}: state dict keys must be parameter names (str), got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{model_path}: {k} holds a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise ValueError(f"{model_path}: {k} has dtype {v.dtype}; weights must be floating point "
                             "(a quantized or corrupt checkpoint?)")
    return without_compile_prefix(state_dict)


def without_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torch.compile'd models save their keys with this prefix
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state_dict.items()}


def detect_era(state_dict: dict[str, torch.Tensor]) -> str:
    prototype = sorted(k for k in state_dict if any(m in k for m in PROTOTYPE_KEY_MARKERS))
    if prototype:
        raise ValueError("checkpoint is from a short-lived nanochat prototype that microvllm does "
                         f"not support (keys {prototype[:4]})")
    if "smear_gate.weight" in state_dict:
        return "E"
    ve_gates = [v for k, v in state_dict.items() if k.endswith("attn.ve_gate.weight")]
    if ve_gates:
        width = ve_gates[0].shape[1]
        if width not in (12, 32):
            raise ValueError(f"unknown value-embedding gate width {width} (known: 32 era C, 12 era D)")
        return "C" if width == 32 else "D"
    return "B" if "resid_lambdas" in state_dict else "A"


def build_model_config(config_dict: dict, state_dict: dict, logit_softcap: float | None) -> ModelConfig:
    era = detect_era(state_dict)
    wte = state_dict.get("transformer.wte.weight")
    if wte is None:
        raise ValueError("checkpoint has no transformer.wte.weight: not a nanochat GPT")
    fields = {k: config_dict[k] for k in REQUIRED_CONFIG_FIELDS}
    config = ModelConfig(**fields, window_pattern=config_dict.get("window_pattern") or "L", era=era,
                         padded_vocab_size=wte.shape[0],
                         logit_softcap=15.0 if logit_softcap is None else logit_softcap)
    if wte.shape[0] < config.vocab_size:
        raise ValueError(f"wte has {wte.shape[0]} rows but meta says vocab_size={config.vocab_size}")
    return config


def check_keys(model: GPT, state_dict: dict) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unknown = sorted(set(state_dict) - set(expected))
    if missing or unknown:
        raise ValueError(f"checkpoint does not match a nanochat era-{model.config.era} GPT: "
                         f"missing keys {missing[:6]}, unknown keys {unknown[:6]}")
    for k, v in expected.items():
        if v.shape != state_dict[k].shape:
            raise ValueError(f"checkpoint key {k} has shape {tuple(state_dict[k].shape)}, "
                             f"expected {tuple(v.shape)} from meta's model_config")


def load_model(model_dir: str | Path, step: int | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", logit_softcap: float | None = None,
               max_positions: int | None = None) -> GPT:
    """The GPT of a nanochat checkpoint dir, in eval mode, cast to `dtype` on `device`.

    `logit_softcap` overrides 15: nanochat used 20 from 2026-03-02 to 03-09 (era C),
    which the weights cannot reveal.
    """
    model_path, meta_path, _ = find_checkpoint(model_dir, step)
    config_dict = read_model_config_dict(meta_path)
    state_dict = read_state_dict(model_path)
    try:
        config = build_model_config(config_dict, state_dict, logit_softcap)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{meta_path.parent}: {e}") from None
    return build_model(config, state_dict, dtype, device, max_positions)


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", max_positions: int | None = None) -> GPT:
    """The GPT of a state dict in nanochat's names, whatever file form it was read from.

    `max_positions` is the engine's max_model_len: the longest sequence served.
    """
    check_max_model_len(max_positions, config)
    with torch.device("meta"):
        model = GPT(config, max_positions)
    check_keys(model, state_dict)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def check_max_model_len(max_model_len: int | None, config: ModelConfig) -> None:
    """Refuses a max_model_len past the model's sequence_len, as vLLM does: the model never
    saw those positions, so what it generates there is untested, and a typo (an extra zero)
    would otherwise also size the KV cache and CUDA graphs for lengths nobody wanted."""
    if max_model_len is None or max_model_len <= config.sequence_len:
        return
    if os.environ.get(ALLOW_LONG_MAX_MODEL_LEN, "").strip().lower() in ("1", "true"):
        return
    raise ValueError(f"max_model_len={max_model_len} is longer than the model's sequence_len="
                     f"{config.sequence_len} (the length it was trained on): use max_model_len <= "
                     f"{config.sequence_len}, or leave it unset; to run past it anyway, set "
                     f"{ALLOW_LONG_MAX_MODEL_LEN}=1")
