"""An independent, plain transcription of nanochat's forward, for checking the engine.

It works on one token sequence with a full recompute, straight from a state dict and
the era table of nanochat-format.md, sharing no code with microvllm.model.
"""

import math

import torch
import torch.nn.functional as F

ERA_CONSTANTS = {  # rotary base, qk scale, ve gate width, ve gate scale, short window(S)
    "A": (10000, 1.0, 0, 0, None),
    "B": (10000, 1.0, 0, 0, lambda s: s // 2),
    "C": (10000, 1.0, 32, 2, lambda s: s // 2),
    "D": (100000, 1.15, 12, 3, lambda s: 128 * math.ceil(math.ceil(s / 3) / 128)),
    "E": (100000, 1.2, 12, 3, lambda s: 128 * math.ceil(math.ceil(s / 4) / 128)),
}


def norm(x):
    return F.rms_norm(x, (x.shape[-1],))


def reference_logits(sd: dict, cfg: dict, era: str, tokens: list[int], softcap: float = 15.0) -> torch.Tensor:
    """[T, vocab] float32 logits of every position of `tokens`."""
    base, qk_scale, gate_width, gate_scale, short = ERA_CONSTANTS[era]
    n_layer, n_head, n_kv = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"]
    d = cfg["n_embd"] // n_head
    S = cfg["sequence_len"]
    idx = torch.tensor(tokens)
    T = len(tokens)

    if short is None:
        windows = [None] * n_layer
    else:
        pattern = cfg.get("window_pattern", "L")
        windows = [short(S) if pattern[i % len(pattern)] == "S" else S for i in range(n_layer)]
        windows[-1] = S

    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(x):  # x [T, heads, d]
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    def linear(x, name):
        return x @ sd[name].float().t()

    x = norm(sd["transformer.wte.weight"].float()[idx])
    if era == "E":
        smeared = x.clone()
        for t in range(1, T):
            gate = sd["smear_lambda"] * torch.sigmoid(x[t, :24] @ sd["smear_gate.weight"][0])
            smeared[t] = x[t] + gate * x[t - 1]
        x = smeared
    x0 = x
    backout = None
    for i in range(n_layer):
        if era != "A":
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        p = f"transformer.h.{i}."
        xn = norm(x)
        q = linear(xn, p + "attn.c_q.weight").view(T, n_head, d)
        k = linear(xn, p + "attn.c_k.weight").view(T, n_kv, d)
        v = linear(xn, p + "attn.c_v.weight").view(T, n_kv, d)
        if gate_width and i % 2 == (n_layer - 1) % 2:
            ve = sd[f"value_embeds.{i}.weight"].float()[idx].view(T, n_kv, d)
            gate = gate_scale * torch.sigmoid(xn[:, :gate_width] @ sd[p + "attn.ve_gate.weight"].float().t())
            v = v + gate[..., None] * ve
        q, k = norm(rotate(q)) * qk_scale, norm(rotate(k)) * qk_scale
        k = k.repeat_interleave(n_head // n_kv, dim=1)
        v = v.repeat_interleave(n_head // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        qpos, kpos = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = kpos <= qpos
        if windows[i] is not None:
            allowed &= qpos - kpos <= windows[i]
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, -1)
        x = x + linear(y, p + "attn.c_proj.weight")
        h = F.relu(linear(norm(x), p + "mlp.c_fc.weight")) ** 2
        x = x + linear(h, p + "mlp.c_proj.weight")
        if i == n_layer // 2:
            backout = x
    if era == "E":
        x = x - sd["backout_lambda"] * backout
    logits = linear(norm(x), "lm_head.weight")[:, :cfg["vocab_size"]]
    return softcap * torch.tanh(logits / softcap)


def reference_greedy(sd, cfg, era, prompt: list[int], max_tokens: int, stop_ids=()):
    """Greedy tokens and their log-probs by full recompute at every step."""
    tokens, out, logprobs = list(prompt), [], []
    for _ in range(max_tokens):
        lp = reference_logits(sd, cfg, era, tokens)[-1].log_softmax(-1)
        token = int(lp.argmax())
        out.append(token)
        logprobs.append(float(lp[token]))
        tokens.append(token)
        if token in stop_ids:
            break
    return out, logprobs


def reference_beam_search(sd, cfg, era, prompt: list[int], width: int, max_tokens: int,
                          eos_ids=(), length_penalty: float = 1.0):
    """Beam search by brute force, with vLLM's rules: (tokens, cum log-prob) pairs, best first.

    Every step scores every live beam's 2 * width most likely next tokens with a full
    recompute; candidates ending in EOS are finished, the `width` best others live on;
    at the end all are ranked by cum_logprob / len ** length_penalty (len counts the
    prompt, not a final EOS).
    """
    def score(beam):
        tokens, cum = beam
        return cum / (len(tokens) - (tokens[-1] in eos_ids)) ** length_penalty

    live, finished = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in live:
            top = reference_logits(sd, cfg, era, tokens)[-1].log_softmax(-1).topk(2 * width)
            for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
                (finished if token in eos_ids else candidates).append((tokens + [token], cum + logprob))
        live = sorted(candidates, key=score, reverse=True)[:width]
        if not live:
            break
    return sorted(finished + live, key=score, reverse=True)[:width]
