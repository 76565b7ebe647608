"""The fused MoE forward: align -> up GEMM (gather + SwiGLU) -> down GEMM (router weight) -> combine."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .align import align_pairs, gemm_rows
from .combine import sum_pairs
from .configs import get_config
from .fused_experts import down_proj, up_proj


def kernel_flags(x: torch.Tensor) -> tuple[bool, bool]:
    """(upcast, ieee): bf16 dots are wrong in the interpreter, so upcast there; fp32 stays exact."""
    upcast = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return upcast, x.dtype == torch.float32 or upcast


def fused_moe_forward(x, topk_ids, topk_weights, w13, w2, cfg=None):
    """Routed-expert output [T, H] in x's dtype; no host synchronisation."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    if T == 0:
        return x.new_empty(0, H)
    cfg = cfg or get_config(x, T, E, H, I, K)
    bm = cfg["BLOCK_M"]
    ids = topk_ids.to(torch.int32).contiguous()
    P = T * K
    R = gemm_rows(P, E, bm)
    _, _, row_src, _, block_expert = align_pairs(ids, E, bm, R, bm)
    upcast, ieee = kernel_flags(x)
    inter = torch.empty(R, I, dtype=x.dtype, device=x.device)
    up_proj(x, w13, inter, row_src, block_expert, K, dict(cfg["up"], BLOCK_M=bm), upcast, ieee)
    w_flat = topk_weights.to(torch.float32).contiguous().view(-1)
    down_cfg = dict(cfg["down"], BLOCK_M=bm)
    if K == 1:
        out = torch.zeros(T, H, dtype=x.dtype, device=x.device)   # ids out of range leave zeros
        down_proj(inter, w2, out, row_src, block_expert, w_flat, K, down_cfg, upcast, ieee, True)
        return out
    y_pairs = torch.empty(P, H, dtype=x.dtype, device=x.device)
    down_proj(inter, w2, y_pairs, row_src, block_expert, w_flat, K, down_cfg, upcast, ieee, False)
    return sum_pairs(y_pairs, ids, E, x.dtype)


def reference_backward(grad_out, x, topk_ids, topk_weights, w13, w2):
    """Gradients (dx, d_topk_weights, dw13, dw2) of the routed-expert output, by the reference's own
    formulas: per expert, the GEMMs in the input dtype with SwiGLU in fp32, exactly what autograd
    computes through the reference ops (no autograd here: this runs inside a custom op).
    Reads the group sizes on the host (training, not the decode hot path)."""
    T, K = topk_ids.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    dt = x.dtype
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    tok = order // K
    counts = torch.bincount(flat, minlength=E).tolist()
    xs, go = x[tok], grad_out.float()[tok]
    wts = topk_weights.float().reshape(-1)[order]
    dx = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    dw = torch.zeros(T * K, dtype=torch.float32, device=x.device)
    d13, d2 = torch.zeros_like(w13), torch.zeros_like(w2)
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        sl = slice(start, start + c)
        start += c
        we13, we2 = w13[e].to(dt), w2[e].to(dt)
        h = F.linear(xs[sl], we13)
        g, u = h.float().chunk(2, dim=-1)
        sg = torch.sigmoid(g)
        a = (g * sg * u).to(dt)
        y = F.linear(a, we2)
        dw[order[sl]] = (go[sl] * y.float()).sum(-1)
        dy = (go[sl] * wts[sl, None]).to(dt)
        d2[e] = (dy.t() @ a).to(w2.dtype)
        da = (dy @ we2).float()
        dg = da * u * sg * (1 + g * (1 - sg))
        du = da * g * sg
        dh = torch.cat([dg, du], dim=-1).to(dt)
        d13[e] = (dh.t() @ xs[sl]).to(w13.dtype)
        dx.index_add_(0, tok[sl], (dh @ we13).float())
    return dx.to(dt), dw.view(T, K).to(topk_weights.dtype), d13, d2
