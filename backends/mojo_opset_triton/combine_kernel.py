"""Deterministic combine: a fixed-order fp32 sum over each token's K slots (no atomics)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import chain_start, launch_options


@triton.jit
def _combine_kernel(src_ptr, stride_sr, pair_row_ptr, ids_ptr, w_ptr, out_ptr, H, E,
                    TOPK: tl.constexpr, BH: tl.constexpr, GATHER: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = h < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        if GATHER:
            # moe_combine: rows come from the permuted expert output, weighted here
            row = tl.load(pair_row_ptr + p).to(tl.int64)
            ok = row >= 0
            w = tl.load(w_ptr + p)
        else:
            # fused path: the pair's row is already weighted; ids outside [0, E) were never computed
            row = p
            e = tl.load(ids_ptr + p)
            ok = (e >= 0) & (e < E)
            w = 1.0
        # the scalar `ok` joins the block through a boolean block: Triton 3.9's interpreter rejects
        # a mask made by splatting a scalar comparison (the compiled code is the same)
        v = tl.load(src_ptr + row * stride_sr + h, mask=hmask & (tl.zeros_like(hmask) | ok),
                    other=0.0).to(tl.float32)
        acc += v * w
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def _launch(src, pair_row, ids, w, out, T, H, E, K, gather, pdl=False):
    if T == 0 or H == 0:
        return out
    BH = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, BH))](src, src.stride(0), pair_row, ids, w, out, H, E,
                                             TOPK=K, BH=BH, GATHER=gather, num_warps=4,
                                             **launch_options(pdl))
    return out


def sum_pairs(y_pairs, topk_ids, num_experts, out_dtype, pdl=False):
    """out[t] = sum_j y_pairs[t*K + j] over the slots whose expert id is in range; ``pdl``: a chained
    launch (pdl.py)."""
    T, K = topk_ids.shape
    H = y_pairs.shape[1]
    out = torch.empty(T, H, dtype=out_dtype, device=y_pairs.device)
    return _launch(y_pairs, topk_ids, topk_ids, y_pairs, out, T, H, num_experts, K, False, pdl)


def combine(expert_out, pair_row, topk_weights, num_tokens):
    """The ``moe_combine`` op: out[t] = sum_j w[t, j] * expert_out[pair_row[t*K + j]], fp32 acc."""
    T, K = num_tokens, topk_weights.shape[1]
    H = expert_out.shape[1]
    if expert_out.stride(1) != 1:
        expert_out = expert_out.contiguous()
    w = topk_weights.float().contiguous()
    pr = pair_row.to(torch.int32).contiguous()
    out = torch.empty(T, H, dtype=expert_out.dtype, device=expert_out.device)
    return _launch(expert_out, pr, pr, w, out, T, H, 0, K, True)
