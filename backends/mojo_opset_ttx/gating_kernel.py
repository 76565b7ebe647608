"""Routing kernel: scores, expert bias, group-limited top-k and weights in one pass over row tiles.

Written under triton-ascend's rules: a persistent 1-D grid over tiles of whole rows; no
``tl.sort``/``tl.topk`` (top-k is K rounds of argmax, lowest expert id on ties); outputs are
assembled in registers and stored as contiguous ``[rows, K]`` tiles.  The selection matches
``mojo_opset.reference.gating.gating_reference`` exactly: NaN choices rank below every number, a row of
NaN picks experts 0..K-1, and ids are clamped into ``[0, E)`` so none is ever out of range.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .platform import needs_int64, num_programs

MAX_EXPERTS = 1024       # a [rows, E] fp32 tile and its companions must fit the on-chip buffer
TILE_ELEMS = 4096        # rows per tile = TILE_ELEMS // next_pow2(E)


@triton.jit
def _gating_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, scores_ptr,
                   T, E, K, G, S, L, route_scale,
                   HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, LIMIT_GROUPS: tl.constexpr,
                   TOP2: tl.constexpr, ROUTE_NORM: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    kcols = tl.arange(0, BLOCK_K)
    num_tiles = tl.cdiv(T, BLOCK_T)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        if WIDE:
            rows = rows.to(tl.int64)
        m2 = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * E + cols[None, :]
        x = tl.load(logits_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if SOFTMAX:
            isnan = x != x
            mx = tl.max(tl.where(m2 & ~isnan, x, float("-inf")), axis=1)
            ex = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
            den = tl.where(row_ok, tl.sum(ex, axis=1), 1.0)  # rows past T: no 0/0
            sc = ex / den[:, None]
            # one NaN logit makes the whole softmax row NaN, as torch.softmax does
            row_nan = tl.max(tl.where(m2 & isnan, 1, 0), axis=1) > 0
            sc = tl.where(row_nan[:, None], float("nan"), sc)
        else:
            sc = tl.sigmoid(x)
        tl.store(scores_ptr + offs, sc, mask=m2)

        choice = sc
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
            choice = choice + b[None, :]
        # NaN ranks below every number, -inf included: rank on the value with NaN as -inf, but
        # only among the non-NaN candidates while a row has any (SPEC 3.1 step 5)
        is_num = choice == choice
        choice = tl.where(is_num, choice, float("-inf"))
        avail = col_ok[None, :] & (rows >= 0)[:, None]

        if LIMIT_GROUPS:
            gcols = tl.arange(0, BLOCK_G)
            grp = cols // S
            gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
            for g in range(G):
                ing = (grp == g)[None, :]
                v = tl.where(ing, choice, float("-inf"))
                top1 = tl.max(v, axis=1)
                if TOP2:  # sum of the two best; drop one occurrence (the lowest id) of the best
                    first = tl.min(tl.where(ing & (v == top1[:, None]), cols[None, :], BLOCK_E), axis=1)
                    top1 = top1 + tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), v), axis=1)
                top1 = tl.where(top1 == top1, top1, float("-inf"))  # inf + -inf: a NaN group ranks last
                gscore = tl.where(gcols[None, :] == g, top1[:, None], gscore)
            gvalid = (gcols < G)[None, :]
            for g in range(G):
                sg = tl.max(tl.where(gcols[None, :] == g, gscore, float("-inf")), axis=1)[:, None]
                # groups ranked before g: higher score, or equal score and lower id
                ahead = gvalid & ((gscore > sg) | ((gscore == sg) & (gcols[None, :] < g)))
                dropped = tl.sum(ahead.to(tl.int32), axis=1) >= L
                avail = avail & ~((grp == g)[None, :] & dropped[:, None])

        ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
        wts = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
        for k in range(K):
            num_left = tl.max(tl.where(avail & is_num, 1, 0), axis=1) > 0
            pool = avail & (is_num | ~num_left[:, None])
            best = tl.max(tl.where(pool, choice, float("-inf")), axis=1)
            cand = pool & (choice == best[:, None])
            pick = tl.min(tl.where(cand, cols[None, :], BLOCK_E), axis=1)
            pick = tl.minimum(pick, E - 1)
            hit = cols[None, :] == pick[:, None]
            wk = tl.sum(tl.where(hit, sc, 0.0), axis=1)
            avail = avail & ~hit
            ids = tl.where(kcols[None, :] == k, pick[:, None], ids)
            wts = tl.where(kcols[None, :] == k, wk[:, None], wts)
        kmask = kcols[None, :] < K
        if ROUTE_NORM:
            wts = wts / (tl.sum(tl.where(kmask, wts, 0.0), axis=1)[:, None] + 1e-20)
        wts = wts * route_scale
        koffs = rows[:, None] * K + kcols[None, :]
        tl.store(ids_ptr + koffs, ids, mask=row_ok[:, None] & kmask)
        tl.store(w_ptr + koffs, wts, mask=row_ok[:, None] & kmask)


def gating(logits: torch.Tensor, top_k: int, score_func: str, route_norm: bool, route_scale: float,
           expert_bias: torch.Tensor | None, num_expert_groups: int, num_limited_groups: int,
           group_score: str):
    """``(topk_ids int32 [T, K], topk_weights fp32 [T, K], scores fp32 [T, E])`` from ``logits [T, E]``."""
    logits = logits.contiguous()
    T, E = logits.shape
    K, G = int(top_k), int(num_expert_groups)
    dev = logits.device
    ids = torch.empty(T, K, dtype=torch.int32, device=dev)
    wts = torch.empty(T, K, dtype=torch.float32, device=dev)
    scores = torch.empty(T, E, dtype=torch.float32, device=dev)
    if T == 0:
        return ids, wts, scores
    block_e = triton.next_power_of_2(E)
    block_t = max(2, min(64, TILE_ELEMS // block_e, triton.next_power_of_2(T)))
    limit = G > 1 and num_limited_groups < G
    bias = expert_bias.float().contiguous() if expert_bias is not None else scores
    tiles = triton.cdiv(T, block_t)
    grid = (num_programs(dev, tiles),)
    _gating_kernel[grid](
        logits, bias, ids, wts, scores, T, E, K, G, E // G, int(num_limited_groups), float(route_scale),
        HAS_BIAS=expert_bias is not None, SOFTMAX=score_func == "softmax", LIMIT_GROUPS=limit,
        TOP2=group_score == "top2_sum" and E // G > 1, ROUTE_NORM=bool(route_norm),
        WIDE=needs_int64(T * E), BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(K), BLOCK_G=triton.next_power_of_2(G))
    return ids, wts, scores
