"""The transformers format of nanochat models (`NanoChatForCausalLM`), read and written.

A transformers nanochat dir holds `config.json` (model_type "nanochat"), the weights
in `*.safetensors` (never a pickle) and the tokenizer as `tokenizer.json`.
transformers' NanoChat model is nanochat's original GPT, our era A, with other names:
weightless RMSNorm on the embeddings, before attention and MLP, on q and k after the
rotary and at the end; rotary over two halves with nanochat's sign (its rotate_half
is cat(x2, -x1), so y1 = x1 cos + x2 sin, as ours); relu^2 MLP; tanh softcap on the
logits; no biases. So the weights map name for name. The config fields that era A
fixes (rotary base, MLP width, activation, biases) are checked, not assumed. Two
harmless differences: its norms use eps 1e-6 where nanochat uses the dtype's machine
epsilon, and it softcaps the padded vocabulary rows too (we drop them, as nanochat).
"""

import json
from pathlib import Path

import torch

from ..extras import import_hf
from .config import ERAS, ModelConfig

MODEL_TYPE = "nanochat"
# (nanochat name, transformers name) of the per-layer weights, under transformer.h.{i}.
# and model.layers.{i}.
LAYER_WEIGHTS = (("attn.c_q.weight", "self_attn.q_proj.weight"), ("attn.c_k.weight", "self_attn.k_proj.weight"),
                 ("attn.c_v.weight", "self_attn.v_proj.weight"), ("attn.c_proj.weight", "self_attn.o_proj.weight"),
                 ("mlp.c_fc.weight", "mlp.fc1.weight"), ("mlp.c_proj.weight", "mlp.fc2.weight"))
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# what transformers assumes when config.json leaves a field out
DEFAULTS = {"hidden_act": "relu2", "attention_bias": False, "final_logit_softcapping": 15.0,
            "tie_word_embeddings": False, "max_position_embeddings": 2048}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json asks for rope scaling {rope}, which nanochat models never use")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_config_from_hf(config: dict, vocab_size: int, logit_softcap: float | None) -> ModelConfig:
    """Our ModelConfig of a transformers NanoChat config.json; `vocab_size` is the tokenizer's.

    config.json's vocab_size counts the embedding rows, which may include nanochat's
    padding to a multiple of 64; the real vocabulary is the tokenizer's.
    """
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json is for model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}: "
                         "microvllm runs nanochat models only")
    missing = [k for k in REQUIRED if not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"config.json lacks integer fields {missing}")
    config = {**DEFAULTS, **config}
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    checks = [("hidden_act", config["hidden_act"], "relu2"), ("attention_bias", config["attention_bias"], False),
              ("intermediate_size", config["intermediate_size"], 4 * n_embd),
              ("rope_theta", rope_theta(config), ERAS["A"].rotary_base)]
    if "head_dim" in config:
        checks.append(("head_dim", config["head_dim"], n_embd // n_head))
    for name, value, expected in checks:
        if value != expected:
            raise ValueError(f"config.json has {name}={value!r}; nanochat's GPT has {expected!r}")
    softcap = config["final_logit_softcapping"] if logit_softcap is None else logit_softcap
    if not isinstance(softcap, (int, float)) or softcap <= 0:
        raise ValueError(f"config.json has final_logit_softcapping={softcap!r}; nanochat models "
                         "softcap their logits (15): pass logit_softcap= to set one")
    if vocab_size > config["vocab_size"]:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but config.json's vocab_size is "
                         f"{config['vocab_size']}: wrong tokenizer for this model")
    return ModelConfig(sequence_len=config["max_position_embeddings"], vocab_size=vocab_size,
                       n_layer=config["num_hidden_layers"], n_head=n_head,
                       n_kv_head=config.get("num_key_value_heads") or n_head, n_embd=n_embd,
                       window_pattern="L", era="A", padded_vocab_size=config["vocab_size"],
                       logit_softcap=float(softcap))


def hf_config(config: ModelConfig, dtype: torch.dtype, bos_token_id: int, eos_token_ids: list[int]) -> dict:
    """config.json for an era-A model; transformers 4.x and 5.x both read it."""
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": config.padded_vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len, "hidden_act": "relu2",
        # nanochat's rms_norm runs at float32's machine epsilon
        "rms_norm_eps": torch.finfo(torch.float32).eps, "attention_bias": False, "attention_dropout": 0.0,
        "rope_theta": config.spec.rotary_base,
        "rope_parameters": {"rope_theta": config.spec.rotary_base, "rope_type": "default"},
        "final_logit_softcapping": config.logit_softcap, "tie_word_embeddings": False,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_ids, "pad_token_id": bos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_weight_names(n_layer: int) -> dict[str, str]:
    """nanochat name -> transformers name, for every weight of an era-A model."""
    names = {"transformer.wte.weight": EMBEDDING, "lm_head.weight": LM_HEAD}
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in LAYER_WEIGHTS})
    return names


def from_hf_state_dict(weights: dict[str, torch.Tensor], config: ModelConfig,
                       tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    names = hf_weight_names(config.n_layer)
    if tie_word_embeddings:  # lm_head is the embedding, whether or not the file repeats it
        weights = {**weights, LM_HEAD: weights.get(EMBEDDING)}
    expected = set(names.values())
    missing = sorted(n for n in expected if weights.get(n) is None)
    unknown = sorted(set(weights) - expected)
    if missing or unknown:
        raise ValueError(f"the safetensors weights do not match a {config.n_layer}-layer NanoChatForCausalLM: "
                         f"missing {missing[:6]}, unknown {unknown[:6]}")
    return {ours: weights[theirs] for ours, theirs in names.items()}


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    if config.era != "A":
        raise ValueError(f"an era-{config.era} checkpoint has features (per-layer lambdas, windows, value "
                         "embeddings, smear) that transformers' NanoChat model lacks; only era-A (the "
                         "original nanochat GPT) checkpoints convert to the transformers format")
    return {theirs: state_dict[ours].contiguous() for ours, theirs in hf_weight_names(config.n_layer).items()}


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint names its shards
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a readable safetensors index: {e}") from None
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}: the transformers format is read "
                                "from safetensors only (pytorch_model.bin is a pickle, which microvllm does not load)")
    return files


def read_checkpoint(model_dir: str | Path, vocab_size: int,
                    logit_softcap: float | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict in nanochat's names) of a transformers NanoChat dir."""
    safetensors_torch = import_hf("safetensors.torch")
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    config = model_config_from_hf(hf, vocab_size, logit_softcap)
    weights = {}
    for path in weight_files(model_dir):
        try:
            weights.update(safetensors_torch.load_file(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    return config, from_hf_state_dict(weights, config, bool(hf.get("tie_word_embeddings")))


def write_checkpoint(directory: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                     bos_token_id: int, eos_token_ids: list[int]) -> None:
    """config.json and model.safetensors of an era-A model (the tokenizer is written apart)."""
    safetensors_torch = import_hf("safetensors.torch")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = to_hf_state_dict(state_dict, config)
    dtype = state_dict["transformer.h.0.attn.c_q.weight"].dtype
    safetensors_torch.save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config_json = hf_config(config, dtype, bos_token_id, eos_token_ids)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
