"""Load new weights into a built model in place: the RL trainer's refresh of the policy.

A state dict in nanochat's names (a `model_<step>.pt`'s keys, or a training GPT's
`state_dict()`) is checked whole against the model first, key by key, shape by shape,
so a mismatch raises before any weight changes and the old weights keep serving.

Every weight is then written into the tensor that already holds it (`copy_`, which
also casts to the engine dtype and moves to its device): nothing is reallocated, so
memory stays flat over many refreshes and recorded CUDA graphs, which replay fixed
addresses, stay valid without a re-capture. Layers swapped in at load time (packed
bfloat16 CPU linears, int8 / fp8 twins) keep no plain weight; they take the new one
through their `load_weight`, which packs or quantizes it into their existing buffers.
The model holds nothing else derived from its weights (the rotary tables depend on
positions only).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from .loader import without_compile_prefix

SHOWN_KEYS = 6  # keys named in a message, at most


@dataclass
class WeightSlot:
    """Where one checkpoint key lands: the shape it must have, and what writes it."""
    shape: torch.Size
    load: Callable[[torch.Tensor], None]


def weight_slots(model: nn.Module) -> dict[str, WeightSlot]:
    """Each checkpoint key of `model`, in nanochat's names, with the slot it loads into."""
    slots = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(module, "load_weight"):  # a swapped-in linear: no Parameter of its own
            shape = torch.Size((module.out_features, module.in_features))
            slots[f"{prefix}weight"] = WeightSlot(shape, module.load_weight)
            continue
        for param_name, param in module.named_parameters(recurse=False):
            slots[prefix + param_name] = WeightSlot(param.shape, param.copy_)
    return slots


def check_weights(slots: Mapping[str, WeightSlot], state_dict: Mapping) -> dict[str, torch.Tensor]:
    """The state dict with its keys normalised, or a ValueError naming what does not fit."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"update_weights takes a state dict (a mapping of names to tensors) or an "
                         f"nn.Module, got {type(state_dict).__name__}")
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"state dict keys must be parameter names (str), got {bad_keys[:SHOWN_KEYS]}")
    weights = without_compile_prefix(dict(state_dict))
    missing = [k for k in slots if k not in weights]
    unexpected = sorted(k for k in weights if k not in slots)
    if missing or unexpected:
        shapes = ", ".join(f"{k} {tuple(slots[k].shape)}" for k in missing[:SHOWN_KEYS])
        raise ValueError("state dict does not match the served model: "
                         + (f"missing keys [{shapes}]" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected keys {unexpected[:SHOWN_KEYS]}" if unexpected else "")
                         + "; expected the keys of the nanochat checkpoint the engine was built from")
    for key, slot in slots.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict key {key} holds a {type(value).__name__}, expected a tensor "
                             f"of shape {tuple(slot.shape)}")
        if value.is_meta:
            raise ValueError(f"state dict key {key} is a meta tensor, which holds no data: give "
                             "the weights themselves (materialise the model before taking its state dict)")
        if not value.is_floating_point():
            raise ValueError(f"state dict key {key} has dtype {value.dtype}, expected a floating point "
                             "dtype (it is cast to the engine's)")
        if value.shape != slot.shape:
            raise ValueError(f"state dict key {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(slot.shape)}")
    return weights


@torch.no_grad()
def load_weights(model: nn.Module, state_dict: Mapping) -> None:
    """Write `state_dict`'s weights into `model` in place, all or none."""
    slots = weight_slots(model)
    weights = check_weights(slots, state_dict)
    for key, slot in slots.items():
        slot.load(weights[key].detach())
