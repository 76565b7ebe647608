"""Fused routing: scores, expert bias, group-limited top-k and weights, one program per token.

The experts of a row are laid out as a 2-D tile ``[groups, experts per group]`` so group scores are
row reductions and no size needs to be a power of two.  Selection repeats "max, then the lowest id
holding it" K times over the eligible lanes (one int64 max per pick, value and id packed, on tiles
of up to ``PACKED_MAX_TILE`` lanes; a max, a NaN count and a min above): this is exactly the
reference's stable descending sort (ties to the lower id).  NaN choices rank below every
number (-inf included): a NaN lane is taken only when no eligible number is left, lowest id first.
Lanes past E are excluded by a mask (not a value), so an all-NaN row picks experts 0..K-1 and no id
is ever out of range.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import chain_start, launch_options, pdl_on

MAX_TILE = 4096   # experts per row held in registers (groups x padded group size)
MAX_TOP_K = 64    # selected experts per row held in registers
# Tiles up to this size pick with one int64 max (value and id packed) rather than a max, a NaN count
# and a min: one H200, 6.1 vs 6.6 us at 128 experts (Qwen3-30B-A3B), 11.9 vs 9.4 us at DeepSeek-V3's
# 8x32 tile (a warp then holds 8 int64 lanes per thread)
PACKED_MAX_TILE = 128


# Only the padded tile (BK, BG, BS) is compile-time.  Sizes (TOPK, G, GS, L) and options (score function,
# bias, group limiting, group score, normalisation) are runtime values, uniform over the grid, with
# Triton's integer specialisations turned off: one compiled variant per tile and logits dtype serves
# every model and option set, instead of one per (E, K, groups, options) combination.
_RUNTIME = ["forced", "TOPK", "G", "GS", "L", "SIGMOID", "HAS_BIAS", "GROUPED", "TOP2", "NORM"]


@triton.jit(do_not_specialize=_RUNTIME)
def _routing_kernel(logits_ptr, stride_lt, stride_le, bias_ptr, forced_ptr, stride_ft, stride_fk,
                    ids_ptr, w_ptr, scores_ptr, route_scale, forced, TOPK, G, GS, L,
                    SIGMOID, HAS_BIAS, GROUPED, TOP2, NORM,
                    BK: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, PACKED: tl.constexpr,
                    PDL: tl.constexpr):
    chain_start(PDL)
    # ``forced`` is a runtime flag, not a constexpr: replaying the natural routing runs the very same
    # compiled kernel, so the scores and weights are bit-identical (a separately compiled variant
    # may evaluate the softmax with other instructions)
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BG)[:, None]
    i = tl.arange(0, BS)[None, :]
    lane = g * GS + i                                   # expert id of each tile element
    valid = (g < G) & (i < GS)
    E = G * GS
    x = tl.load(logits_ptr + t * stride_lt + lane * stride_le, mask=valid, other=0.0).to(tl.float32)
    if SIGMOID != 0:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        xm = tl.where(valid, x, float("-inf"))
        m = tl.max(tl.max(xm, axis=1), axis=0)
        ex = tl.where(valid, tl.exp(xm - m), 0.0)
        s = ex / tl.sum(tl.sum(ex, axis=1), axis=0)
    tl.store(scores_ptr + t * E + lane, s, mask=valid)

    kk = tl.arange(0, BK)
    if forced != 0:
        ids = tl.load(forced_ptr + t * stride_ft + kk * stride_fk, mask=kk < TOPK, other=0).to(tl.int32)
    else:
        ids = tl.zeros([BK], dtype=tl.int32)
        choice = s
        if HAS_BIAS != 0:
            choice = choice + tl.load(bias_ptr + lane, mask=valid, other=0.0).to(tl.float32)
        isnum = choice == choice
        choice = tl.where(isnum, choice, float("-inf"))
        avail = valid
        if GROUPED != 0:
            c = tl.where(valid, choice, float("-inf"))
            m1 = tl.max(c, axis=1)
            if TOP2 != 0:
                first = tl.min(tl.where(valid & (c == m1[:, None]), i, BS), axis=1)
                m2 = tl.max(tl.where(i == first[:, None], float("-inf"), c), axis=1)
                gsc = m1 + m2
            else:
                gsc = m1
            gsc = tl.where(gsc != gsc, float("-inf"), gsc)   # inf + -inf: such a group ranks last
            gid = tl.arange(0, BG)
            gavail = gid < G
            keep = gid < 0
            for _ in range(L):
                cur = tl.where(gavail, gsc, float("-inf"))
                best = tl.max(cur, axis=0)
                pick = tl.min(tl.where(gavail & (cur == best), gid, BG), axis=0)
                keep = keep | (gid == pick)
                gavail = gavail & (gid != pick)
            avail = valid & keep[:, None]
        if PACKED:
            # each lane as one int64, ordered as the selection ranks lanes: above, the choice's bits made
            # order-preserving (-0.0 as +0.0; NaN below -inf); below, the complement of the lane id (ties
            # to the lower id).  A pick is then a single max, instead of a max, a NaN count and a min.
            bits = (choice + 0.0).to(tl.int32, bitcast=True)
            key = tl.where(isnum, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF), -2147483648)
            packed = (key.to(tl.int64) << 32) | (4294967295 - lane.to(tl.int64))
            for k in range(TOPK):
                best = tl.max(tl.max(tl.where(avail, packed, -9223372036854775808), axis=1), axis=0)
                idx = (4294967295 - (best & 4294967295)).to(tl.int32)
                avail = avail & (lane != idx)
                ids = tl.where(kk == k, idx, ids)
        else:
            for k in range(TOPK):
                num_avail = avail & isnum
                cur = tl.where(num_avail, choice, float("-inf"))
                best = tl.max(tl.max(cur, axis=1), axis=0)
                n_num = tl.sum(tl.sum(num_avail.to(tl.int32), axis=1), axis=0)
                cand = tl.where(n_num > 0, num_avail & (cur == best), avail)
                idx = tl.min(tl.min(tl.where(cand, lane, E), axis=1), axis=0)
                avail = avail & (lane != idx)
                ids = tl.where(kk == k, idx, ids)
    # one gather for both paths: the weights of the chosen (or given) experts, read back from the
    # unbiased scores stored above (the barrier makes every lane's store visible to the program)
    tl.debug_barrier()
    wv = tl.load(scores_ptr + t * E + ids, mask=kk < TOPK, other=0.0)
    if NORM != 0:
        wv = wv / (tl.sum(tl.where(kk < TOPK, wv, 0.0), axis=0) + 1e-20)
    wv = wv * route_scale          # exact when route_scale is 1
    tl.store(ids_ptr + t * TOPK + kk, ids, mask=kk < TOPK)
    tl.store(w_ptr + t * TOPK + kk, wv, mask=kk < TOPK)


def tile_shape(num_experts: int, num_expert_groups: int, grouped: bool) -> tuple[int, int, int, int]:
    """(G, GS, BG, BS): the row's tile; without group limiting the row is one group."""
    G = num_expert_groups if grouped else 1
    GS = num_experts // G
    return G, GS, triton.next_power_of_2(G), triton.next_power_of_2(GS)


def routing_reasons(logits, top_k, score_func, group_score, num_expert_groups, num_limited_groups) -> list[str]:
    out = []
    E = logits.shape[1]
    grouped = num_expert_groups > 1 and num_limited_groups < num_expert_groups
    _, _, BG, BS = tile_shape(E, num_expert_groups, grouped)
    if BG * BS > MAX_TILE:
        out.append(f"E = {E} experts pad to a {BG}x{BS} tile, over the kernel's limit of {MAX_TILE}")
    if top_k > MAX_TOP_K:
        out.append(f"top_k = {top_k} is over the kernel's limit of {MAX_TOP_K}")
    if score_func not in ("softmax", "sigmoid"):
        out.append(f"score_func {score_func!r} is not implemented")
    if group_score not in ("top2_sum", "max"):
        out.append(f"group_score {group_score!r} is not implemented")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        out.append(f"logits dtype {logits.dtype} is not served")
    return out


def route(logits, expert_bias, forced_expert_ids, top_k: int, score_func: str, route_norm: bool,
          route_scale: float, num_expert_groups: int, num_limited_groups: int, group_score: str):
    """Launch the routing kernel; returns (ids int32 [T, K], weights fp32 [T, K], scores fp32 [T, E])."""
    T, E = logits.shape
    dev = logits.device
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    scores = torch.empty(T, E, dtype=torch.float32, device=dev)
    if T == 0:
        return ids, w, scores
    # the tile layout fixes the softmax's reduction order: forced ids keep the natural call's layout so
    # replaying the natural routing gives bit-identical weights
    grouped = num_expert_groups > 1 and num_limited_groups < num_expert_groups
    G, GS, BG, BS = tile_shape(E, num_expert_groups, grouped)
    bias = expert_bias if expert_bias is not None else scores          # unused pointer when absent
    forced = forced_expert_ids if forced_expert_ids is not None else ids
    tile = BG * BS
    _routing_kernel[(T,)](
        logits, logits.stride(0), logits.stride(1), bias, forced, forced.stride(0), forced.stride(1),
        ids, w, scores, float(route_scale), int(forced_expert_ids is not None),
        top_k, G, GS, num_limited_groups if grouped else 1,
        int(score_func == "sigmoid"), int(expert_bias is not None), int(grouped),
        int(group_score == "top2_sum" and GS > 1), int(bool(route_norm)),
        BK=triton.next_power_of_2(top_k), BG=BG, BS=BS, PACKED=tile <= PACKED_MAX_TILE,
        num_warps=1 if tile <= 256 else (4 if tile <= 2048 else 8), **launch_options(pdl_on(logits)))
    return ids, w, scores
