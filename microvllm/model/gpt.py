"""nanochat's GPT, for inference over one flat batch of tokens.

The engine packs the tokens of every scheduled sequence into one 1-D batch (no padding
of the linear layers), so the model sees `input_ids[N]` with each token's absolute
position and the id of the token before it (-1 at position 0, for smear). How tokens
attend to each other (a KV cache, or plain causal attention for training and reference
runs) is the `attention` callable's business: the model knows nothing of scheduling.

Parameter names match nanochat's state dict so checkpoints load as they are. What
differs between nanochat's eras (which parts a checkpoint has, its constants) is read
from the checkpoint in `config.py`; the forward below computes every era's math.
"""

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# attention(layer_idx, q[N,H,d], k[N,Hkv,d], v[N,Hkv,d], window) -> y[N,H,d]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int | None], torch.Tensor]

SMEAR_GATE_CHANNELS = 24


def _embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    # left uninitialised: weights come from a checkpoint or a trainer's own init, and
    # the default normal_ init costs a second on the meta device the loader builds on
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # nanochat rotates by -theta (y1 = x1 cos + x2 sin): kept for checkpoint compatibility
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class TorchOps:
    """The forward's RMSNorm, rotary embedding and relu^2 as torch ops: any device, any dtype.
    `microvllm.cpu.ops.CpuOps` does the same in fused C kernels; a model's `ops` is one of them."""

    rms_norm = staticmethod(rms_norm)

    @staticmethod
    def rotary_norm(cos_table, sin_table, positions):
        """A function of one step: x[N, heads * head_dim] -> rms_norm(rotary(x)) * scale,
        as [N, heads, head_dim], at each token's position."""
        cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)

        def rotate_and_norm(x, heads, scale):
            y = rms_norm(apply_rotary(x.view(x.shape[0], heads, -1), cos, sin))
            return y * scale if scale != 1.0 else y
        return rotate_and_norm

    @staticmethod
    def relu_squared_(x: torch.Tensor) -> torch.Tensor:
        """relu(x)^2, in place: the MLP's hidden activation is the forward's largest tensor.
        Out of place where autograd records it (models/train_demo.py): square's backward
        reads relu's output."""
        return x.relu().square() if x.requires_grad else x.relu_().square_()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_scale = config.spec.qk_scale
        self.ve_gate_scale = config.spec.ve_gate_scale
        self.ve_gate_channels = config.spec.ve_gate_channels
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if config.has_value_embeds(layer_idx) else None)

    def forward(self, xn, value_embed, rotary_norm, window, attention: AttentionFn):
        n = xn.shape[0]
        q = rotary_norm(self.c_q(xn), self.n_head, self.qk_scale)
        k = rotary_norm(self.c_k(xn), self.n_kv_head, self.qk_scale)
        v = self.c_v(xn).view(n, self.n_kv_head, self.head_dim)
        if value_embed is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(xn[:, :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * value_embed.view(n, self.n_kv_head, self.head_dim)
        y = attention(self.layer_idx, q, k, v, window)
        return self.c_proj(y.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x, ops):
        return self.c_proj(ops.relu_squared_(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, value_embed, ops, rotary_norm, window, attention: AttentionFn):
        x = x + self.attn(ops.rms_norm(x), value_embed, rotary_norm, window, attention)
        return x + self.mlp(ops.rms_norm(x), ops)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        spec, vocab = config.spec, config.padded_vocab_size
        self.window_sizes = config.window_sizes
        self.transformer = nn.ModuleDict({
            "wte": _embedding(vocab, config.n_embd),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if spec.has_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if spec.ve_gate_channels:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({
                str(i): _embedding(vocab, kv_dim)
                for i in range(config.n_layer) if config.has_value_embeds(i)})
        if spec.has_smear_backout:
            self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # nanochat precomputes 10x its training length of rotary tables; so do we
        self.max_positions = max_positions or 10 * config.sequence_len
        cos, sin = self._rotary_tables(self.max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.ops = TorchOps

    def _rotary_tables(self, num_positions: int):
        # computed on the CPU even when the module is built on the meta device for loading
        head_dim = self.config.head_dim
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (self.config.spec.rotary_base ** (channels / head_dim))
        positions = torch.arange(num_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)
        return freqs.cos(), freqs.sin()

    def _embed(self, input_ids, prev_token_ids):
        wte, rms_norm = self.transformer.wte, self.ops.rms_norm
        x = rms_norm(wte(input_ids))
        if not self.config.spec.has_smear_backout:
            return x
        # Smear mixes in the previous token's normalised embedding. Recomputing it from
        # the previous token id keeps decode and mid-sequence prefill chunks stateless.
        prev = rms_norm(wte(prev_token_ids.clamp(min=0)))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, :SMEAR_GATE_CHANNELS]))
        return torch.where((prev_token_ids >= 0).unsqueeze(-1), x + gate * prev, x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                prev_token_ids: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """Returns the final normalised hidden state of every token, [N, n_embd]."""
        spec, ops = self.config.spec, self.ops
        rotary_norm = ops.rotary_norm(self.cos, self.sin, positions)
        x = x0 = self._embed(input_ids, prev_token_ids)
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if spec.has_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = self.value_embeds[str(i)](input_ids) if block.attn.ve_gate is not None else None
            x = block(x, value_embed, ops, rotary_norm, self.window_sizes[i], attention)
            if i == backout_layer:
                x_backout = x
        if spec.has_smear_backout:
            x = x - self.backout_lambda * x_backout
        return ops.rms_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Softcapped float32 logits over the real (unpadded) vocabulary."""
        logits = self.lm_head(hidden)[:, :self.config.vocab_size].float()
        cap = self.config.logit_softcap
        # cap * tanh(x / cap), written as cap * (2 sigmoid(2x / cap) - 1): torch's CPU tanh
        # is several times slower than its sigmoid, on [rows, vocab] every step
        squashed = torch.sigmoid(logits.mul_(2 / cap))
        # sigmoid's backward reads its output: training (models/train_demo.py) needs it kept
        scaled = squashed.mul(2 * cap) if squashed.requires_grad else squashed.mul_(2 * cap)
        return scaled.sub_(cap)
