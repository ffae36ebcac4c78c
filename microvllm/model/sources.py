"""Where a model comes from: `LLM(model=...)` resolved to a GPT and its tokenizer.

`model` may be
- a local directory in nanochat's own format (`model_<step>.pt` + `meta_<step>.json`)
  or in the transformers format (`config.json` of model_type "nanochat" +
  `*.safetensors`);
- `SOURCE` or `SOURCE:TAG`, a checkpoint of nanochat's own output tree, as nanochat
  names them: SOURCE is the training phase (base, mid, sft, rl), TAG the model tag
  (d20, ...), under `$NANOCHAT_BASE_DIR` (default ~/.cache/nanochat). Without a TAG
  the largest model of that phase, as nanochat picks it;
- `ORG/NAME`, a Hugging Face hub repo: read from the local hub cache when it is
  there, otherwise downloaded, unless HF_HUB_OFFLINE=1 forbids it. A name of that form
  that starts with a dot, or whose ORG is a local directory (`models/shakespeare-d5`
  run where `models/` exists), is a path: a mistyped one says it does not exist
  instead of sending the typo to the hub.
Every form becomes one local dir, then one state dict + ModelConfig + Tokenizer, and
only then a GPT: the engine never knows which form it was given.
"""

import difflib
import os
import re
from pathlib import Path

import torch

from ..extras import import_hf
from ..tokenizer import Tokenizer
from . import hf_format
from .gpt import GPT
from .loader import build_model, load_model

NANOCHAT_SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                    "rl": "chatrl_checkpoints"}
SOURCE_FORM = re.compile(rf"({'|'.join(NANOCHAT_SOURCES)})(?::([\w.-]+))?")
HUB_ID_FORM = re.compile(r"[\w.-]+/[\w.-]+")
# what a hub download fetches: either format's files, never optimizer states
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.pkl", "tokenizer/tokenizer.pkl"]
FORMS = ("a local checkpoint dir, a nanochat SOURCE[:TAG] (SOURCE one of "
         f"{', '.join(NANOCHAT_SOURCES)}; e.g. 'sft:d20'), or a Hugging Face hub id ORG/NAME")


def nanochat_base_dir() -> Path:
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def nanochat_checkpoint_dir(source: str, tag: str | None) -> Path:
    """nanochat's checkpoint dir of one training phase; without `tag`, its largest model."""
    phase_dir = nanochat_base_dir() / NANOCHAT_SOURCES[source]
    tags = sorted(p.name for p in phase_dir.iterdir() if p.is_dir()) if phase_dir.is_dir() else []
    if tag is None and tags:
        # as nanochat: the deepest dN, else the most recently written dir
        depths = {int(m.group(1)): t for t in tags if (m := re.fullmatch(r"d(\d+)", t))}
        tag = depths[max(depths)] if depths else max(tags, key=lambda t: (phase_dir / t).stat().st_mtime)
    if tag not in tags:
        raise FileNotFoundError(
            f"model={source + (':' + tag if tag else '')!r}: no checkpoint dir "
            f"{phase_dir / (tag or '<tag>')}; model tags there: {tags or 'none'}. nanochat's output tree is "
            "$NANOCHAT_BASE_DIR (default ~/.cache/nanochat)")
    return phase_dir / tag


def _downloads_off(hub_constants) -> bool:
    # the hub library reads HF_HUB_OFFLINE once, at import: a setting made since counts too
    return hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot_dir(repo_id: str, revision: str | None = None, step: int | None = None) -> Path:
    """The local snapshot of a hub repo: the cached one if any, else a download when allowed."""
    hub, errors, constants = (import_hf(f"huggingface_hub{sub}") for sub in ("", ".errors", ".constants"))
    patterns = HUB_FILES + ["model_*.pt" if step is None else f"model_{step:06d}.pt"]
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          local_files_only=True))
    except errors.LocalEntryNotFoundError:  # not cached, or cached only in part
        pass
    if _downloads_off(constants):
        raise FileNotFoundError(
            f"model={repo_id!r} is not a local dir, and the hub repo {repo_id} is not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) while downloads are off (HF_HUB_OFFLINE=1). Fetch it "
            f"where there is network with `hf download {repo_id}` (and copy the cache here), or unset "
            "HF_HUB_OFFLINE to let microvllm download it")
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # not found, gated, no network: all end here, named
        raise FileNotFoundError(f"model={repo_id!r} is not a local dir, and downloading the hub repo "
                                f"{repo_id} failed: {type(e).__name__}: {e}") from None


def resolve_model_dir(model: str | Path, revision: str | None = None, step: int | None = None) -> Path:
    """The local directory that `model` names, in any of the forms above."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model={str(model)!r} is a file; give the directory that holds it")
    name = str(model)
    if match := SOURCE_FORM.fullmatch(name):
        return nanochat_checkpoint_dir(*match.groups())
    if HUB_ID_FORM.fullmatch(name) and not _path_like(name):
        return hub_snapshot_dir(name, revision, step)
    raise FileNotFoundError(f"model: {name} does not exist{_nearby(path)}; model takes {FORMS}")


def _path_like(name: str) -> bool:
    """Whether an ORG/NAME-shaped name means a local path: hub names never start with a dot
    ('./x', '../x'), and an ORG that is a local dir says the user meant what lies in it."""
    return name.startswith(".") or Path(name.split("/")[0]).is_dir()


def _nearby(path: Path) -> str:
    """What the missing path's parent holds, the closest name first, to show a typo."""
    parent = path.parent
    if not parent.is_dir():
        return f" (nor does {parent})"
    where = f"the current directory ({Path.cwd()})" if str(parent) == "." else str(parent)
    entries = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    close = difflib.get_close_matches(path.name, entries, n=1, cutoff=0.5)
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} in all)" if len(entries) > 20 else "")
    return (f" ({where} holds: {shown or 'nothing'}"
            + (f"; did you mean {str(parent / close[0])!r}?)" if close else ")"))


def detect_format(model_dir: Path, step: int | None = None) -> str:
    """'transformers' or 'nanochat', or an error that says what was looked for."""
    has_native = any(re.fullmatch(r"model_\d+\.pt", p.name) for p in model_dir.iterdir())
    model_type = None
    if (model_dir / "config.json").is_file():
        model_type = hf_format.read_config(model_dir).get("model_type")
        # a repo holding both formats is read from its safetensors (no pickle), unless a step is asked for
        safetensors_first = step is None and any(model_dir.glob("*.safetensors"))
        if model_type == hf_format.MODEL_TYPE and (not has_native or safetensors_first):
            return "transformers"
    if has_native:
        return "nanochat"
    if model_type is not None:
        raise ValueError(f"{model_dir / 'config.json'} is for model_type {model_type!r}, not "
                         f"{hf_format.MODEL_TYPE!r}: microvllm runs nanochat models only")
    raise FileNotFoundError(
        f"{model_dir} holds no model: looked for nanochat's model_<step>.pt + meta_<step>.json, and for "
        "the transformers format's config.json (model_type 'nanochat') + *.safetensors")


def load_model_and_tokenizer(model: str | Path, tokenizer: str | Path | None = None, step: int | None = None,
                             revision: str | None = None, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", logit_softcap: float | None = None,
                             max_positions: int | None = None) -> tuple[GPT, Tokenizer]:
    """The GPT (eval mode, `dtype`, on `device`) and tokenizer that `model` names."""
    model_dir = resolve_model_dir(model, revision, step)
    if detect_format(model_dir, step) == "nanochat":
        return (load_model(model_dir, step, dtype, device, logit_softcap, max_positions),
                Tokenizer.find(model_dir, tokenizer))
    if step is not None:
        raise ValueError(f"step={step} picks a checkpoint of a nanochat dir, but {model_dir} is in the "
                         "transformers format, which holds one: leave step unset")
    tok = Tokenizer.find(model_dir, tokenizer)  # its vocab size says how much of the embedding is padding
    config, state_dict = hf_format.read_checkpoint(model_dir, tok.vocab_size, logit_softcap)
    return build_model(config, state_dict, dtype, device, max_positions), tok
