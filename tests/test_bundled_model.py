"""The demo model bundled in models/ loads with microvllm and writes text."""

import json
import re
from pathlib import Path

import pytest
import torch

from microvllm import LLM, SamplingParams
from microvllm.model.attention import DenseCausalAttention
from microvllm.model.loader import load_model

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "shakespeare-d4"
MAX_DIR_BYTES = 16 * 2**20


@pytest.fixture(scope="module")
def llm():
    return LLM(model=str(MODEL_DIR), device="cpu", dtype="float32", kv_cache_memory=32 * 2**20)


def test_bundled_model_files():
    (meta_path,) = MODEL_DIR.glob("meta_*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["model_config"]["sequence_len"] == 512
    assert meta["model_config"]["window_pattern"] == "SSSL"
    assert (MODEL_DIR / meta_path.name.replace("meta_", "model_").replace(".json", ".pt")).is_file()
    assert sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file()) <= MAX_DIR_BYTES


def test_bundled_model_is_current_nanochat_architecture(llm):
    model = load_model(MODEL_DIR)
    assert model.config.era == "E"  # smear, backout, value embeddings, sliding windows
    assert model.config.window_sizes == [128, 128, 128, 512]
    assert llm.tokenizer.vocab_size == model.config.vocab_size == 4096


def test_bundled_model_generates_text_greedily(llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    first, again = (llm.generate(["ROMEO.\n"], params, use_tqdm=False)[0] for _ in range(2))
    text = first.outputs[0].text
    assert len(first.outputs[0].token_ids) > 0 and text.strip()
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 3  # words, not byte soup
    assert again.outputs[0].text == text                 # greedy is deterministic


def test_the_model_trains_as_train_demo_trains_it(checkpoint_dir):
    """models/train_demo.py backpropagates through the forward the engine runs."""
    model = load_model(checkpoint_dir).train().requires_grad_(True)
    ids = torch.arange(1, 17)
    hidden = model(ids, torch.arange(16), torch.cat([torch.tensor([-1]), ids[:-1]]), DenseCausalAttention(1))
    model.compute_logits(hidden).logsumexp(dim=-1).sum().backward()
    assert all(p.grad is not None for p in (model.lm_head.weight, model.transformer.h[0].mlp.c_fc.weight))
