"""Independent, deliberately naive MoE implementations the reference is checked against.

Routing is decided in plain Python per token (sort keys spell out the tie and NaN rules); the
forward is a per-token, per-slot loop in fp32 built from elementary torch ops, so autograd through
it gives reference gradients.  Nothing here imports mojo_opset.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

F32 = np.float32


def _rank_value(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def naive_topk(scores_row, top_k, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
               group_score="top2_sum"):
    """SPEC §3.1 steps 3-5 for one token; sums in float32 as the reference does."""
    scores_row = np.asarray(scores_row, dtype=F32)
    choice = scores_row if expert_bias is None else (scores_row + np.asarray(expert_bias, dtype=F32)).astype(F32)
    E = len(choice)
    G = num_expert_groups
    L = G if num_limited_groups is None else num_limited_groups
    eligible = [True] * E
    if G > 1 and L < G:
        n = E // G
        group_scores = []
        for g in range(G):
            vals = sorted((_rank_value(float(v)) for v in choice[g * n:(g + 1) * n]), reverse=True)
            if group_score == "max" or n == 1:
                s = vals[0]
            else:
                s = float(F32(vals[0]) + F32(vals[1]))
            group_scores.append(_rank_value(s))
        kept = sorted(range(G), key=lambda g: (-group_scores[g], g))[:L]
        eligible = [e // n in kept for e in range(E)]
    order = sorted(range(E), key=lambda e: (not eligible[e], math.isnan(float(choice[e])),
                                            -_rank_value(float(choice[e])), e))
    return order[:top_k]


def naive_scores(x2, gate_weight, gate_bias=None, score_func="softmax"):
    logits = x2.float() @ gate_weight.float().t()
    if gate_bias is not None:
        logits = logits + gate_bias.float()
    return torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)


def naive_ids(scores, top_k, **routing):
    rows = scores.detach().float().cpu().numpy()
    return torch.tensor([naive_topk(r, top_k, **routing) for r in rows], dtype=torch.int64).reshape(-1, top_k)


def swiglu_mlp(xt, w13e, w2e):
    """One token through one SwiGLU expert, in fp32: ``w2 @ (silu(W1 x) * (W3 x))``."""
    w1, w3 = w13e.float().chunk(2, dim=0)
    xt = xt.float()
    return w2e.float() @ (F.silu(w1 @ xt) * (w3 @ xt))


def naive_moe(x2, gate_weight, w13, w2, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
              route_scale=1.0, ids=None, shared_w13=None, shared_w2=None, shared_gate=None, **routing):
    """Per-token loop: ``sum_j w_j * expert_{id_j}(x_t) (+ shared(x_t))``, fp32; returns (y, ids, weights)."""
    scores = naive_scores(x2, gate_weight, gate_bias, score_func)
    if ids is None:
        ids = naive_ids(scores, top_k, **routing)
    outs, weights = [], []
    for t in range(x2.shape[0]):
        w = scores[t, ids[t]]
        if route_norm:
            w = w / (w.sum() + 1e-20)
        w = w * route_scale
        weights.append(w)
        acc = torch.zeros(x2.shape[1], dtype=torch.float32)
        for j, e in enumerate(ids[t].tolist()):
            acc = acc + w[j] * swiglu_mlp(x2[t], w13[e], w2[e])
        if shared_w13 is not None:
            s = swiglu_mlp(x2[t], shared_w13, shared_w2)
            if shared_gate is not None:
                s = s * torch.sigmoid(shared_gate.float() @ x2[t].float())
            acc = acc + s
        outs.append(acc)
    H = x2.shape[1]
    y = torch.stack(outs) if outs else torch.zeros(0, H)
    w = torch.stack(weights) if weights else torch.zeros(0, top_k)
    return y, ids, w


def make_moe(T=6, H=16, E=4, I=8, dtype=torch.float32, seed=0, shared=False, shared_gate=False, gate_bias=False,
             requires_grad=False):
    """Small well-scaled MoE inputs (values O(1))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    d = dict(x=rnd(T, H), gate_weight=rnd(E, H, scale=H ** -0.5), w13=rnd(E, 2 * I, H, scale=H ** -0.5),
             w2=rnd(E, H, I, scale=I ** -0.5))
    if gate_bias:
        d["gate_bias"] = rnd(E, scale=0.1)
    if shared:
        d["shared_w13"] = rnd(2 * I, H, scale=H ** -0.5)
        d["shared_w2"] = rnd(H, I, scale=I ** -0.5)
    if shared_gate:
        d["shared_gate"] = rnd(1, H, scale=H ** -0.5)
    return d
