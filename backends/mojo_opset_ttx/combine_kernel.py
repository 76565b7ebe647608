"""Combine kernel: ``out[t] = sum_j w[t, j] * Y[pair_row[t*K + j]]`` with fp32 accumulation.

Deterministic by construction: every output tile is owned by one program, which adds the K
contributions in slot order (no atomics).  Work items are (token tile, hidden tile) pairs visited by
a persistent 1-D grid; ``pair_row`` and the weights are read as contiguous ``[BLOCK_T, K]`` tiles
and the expert rows as contiguous ``BLOCK_H`` row segments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .platform import interpreter_on, needs_int64, num_programs


@triton.jit
def _combine(y_ptr, pair_row_ptr, w_ptr, out_ptr, T, H, K, R,
             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_h = tl.cdiv(H, BLOCK_H)
    total = tl.cdiv(T, BLOCK_T) * n_h
    kcols = tl.arange(0, BLOCK_K)
    for item in range(pid, total, nprog):
        rows = (item // n_h) * BLOCK_T + tl.arange(0, BLOCK_T)
        hc = (item % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)
        rm = rows < T
        hm = hc < H
        km = rm[:, None] & (kcols < K)[None, :]
        koffs = rows[:, None] * K + kcols[None, :]
        src = tl.load(pair_row_ptr + koffs, mask=km, other=-1)
        wt = tl.load(w_ptr + koffs, mask=km, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
        for j in range(K):
            sel = kcols[None, :] == j
            r = tl.sum(tl.where(sel, src, 0), axis=1)
            w = tl.sum(tl.where(sel, wt, 0.0), axis=1)
            ok = rm & (r >= 0) & (r < R)
            if WIDE:
                r = r.to(tl.int64)
            v = tl.load(y_ptr + r[:, None] * H + hc[None, :], mask=ok[:, None] & hm[None, :], other=0.0)
            acc += w[:, None] * v.to(tl.float32)
        orow = rows.to(tl.int64) if WIDE else rows
        tl.store(out_ptr + orow[:, None] * H + hc[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rm[:, None] & hm[None, :])


def combine(expert_out: torch.Tensor, pair_row: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int):
    """``[T, H]`` in expert_out's dtype."""
    y = expert_out.contiguous()
    T, K = int(num_tokens), int(topk_weights.shape[1])
    R, H = y.shape
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    rows = pair_row.to(torch.int32).contiguous()
    w = topk_weights.float().contiguous()
    block_k = triton.next_power_of_2(K)
    block_h = min(64 if interpreter_on() else 256, triton.next_power_of_2(H))
    block_t = max(1, min(16, 4096 // block_h, triton.next_power_of_2(T)))
    items = triton.cdiv(T, block_t) * triton.cdiv(H, block_h)
    _combine[(num_programs(y.device, items),)](
        y, rows, w, out, T, H, K, R, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_K=block_k,
        WIDE=needs_int64(R * H, T * H))
    return out
