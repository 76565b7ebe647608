"""One-token experts as matrix-vector products (decode): each pair has one row, so no tensor-core tile.

At T = 1 every expert of a pair sees a single row; a ``tl.dot`` tile pads it to 16 rows and, with the
column blocks a dot needs, leaves a few hundred programs that each stream a large weight slice (1.5
waves on an H200 for Qwen3-30B-A3B).  Here each program multiplies a few weight rows by the token's row
on the CUDA cores (fp32 products, per-lane partial sums reduced once at the end), so thousands of
small programs keep every SM streaming.

``_up_gemv_kernel``: per (pair, column block) the gate and up rows of ``w13[e]`` times x's row,
SwiGLU in the epilogue, one intermediate row per pair.  ``_down_combine_kernel``: per (token, column
block) every slot's ``w2[e]`` rows times its intermediate row, then the combine in the same program:
the same roundings as the tiled path (GEMM output rounded to the dtype, times the router weight,
rounded, summed over the slots in fp32), so no per-pair buffer and no combine launch.
Slots whose expert id is outside ``[0, E)`` contribute nothing.  A tile's optional ``evict``
(``evict_first`` / ``evict_last``) is the cache eviction hint of that kernel's weight loads, searched
by the tuner per shape (it moves the one-token forward by a few microseconds either way).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pdl import chain_start, launch_options


@triton.jit
def _up_gemv_kernel(x_ptr, w_ptr, out_ptr, ids_ptr, I, H, E, stride_xt, stride_we, stride_wn,
                    TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    EVICT: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p)
    if (e < 0) | (e >= E):
        return
    x_row = x_ptr + (p // TOPK).to(tl.int64) * stride_xt
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < I)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    g_rows = w_ptr + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    u_rows = g_rows + I * stride_wn          # up rows follow the gate rows
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            a = tl.load(x_row + kk)
            g = tl.load(g_rows + kk[None, :], mask=mask_n, other=0.0, eviction_policy=EVICT)
            u = tl.load(u_rows + kk[None, :], mask=mask_n, other=0.0, eviction_policy=EVICT)
        else:
            kmask = kk < H
            a = tl.load(x_row + kk, mask=kmask, other=0.0)
            g = tl.load(g_rows + kk[None, :], mask=mask_n & kmask[None, :], other=0.0, eviction_policy=EVICT)
            u = tl.load(u_rows + kk[None, :], mask=mask_n & kmask[None, :], other=0.0, eviction_policy=EVICT)
        a = a.to(tl.float32)[None, :]
        acc_g += g.to(tl.float32) * a
        acc_u += u.to(tl.float32) * a
    dt = out_ptr.dtype.element_ty
    gate = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
    up = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + p.to(tl.int64) * I + offs_n, act.to(dt), mask=offs_n < I)


@triton.jit
def _down_combine_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, weight_ptr, H, I, E, stride_we, stride_wn,
                         TOPK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, EVICT: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    j = tl.arange(0, SLOTS)                                # SLOTS: TOPK rounded up to a power of two
    p = t * TOPK + j
    e = tl.load(ids_ptr + p, mask=j < TOPK, other=-1)
    ok = (j < TOPK) & (e >= 0) & (e < E)
    e = tl.where(ok, e, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + p[:, None] * I                                                     # [SLOTS, 1]
    w_rows = w_ptr + e[:, None, None] * stride_we + offs_n.to(tl.int64)[None, :, None] * stride_wn
    a_mask = ok[:, None]
    w_mask = ok[:, None, None] & mask_n[None, :, None]
    acc = tl.zeros([SLOTS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
            w = tl.load(w_rows + kk[None, None, :], mask=w_mask, other=0.0, eviction_policy=EVICT)
        else:
            kmask = kk < I
            a = tl.load(a_rows + kk[None, :], mask=a_mask & kmask[None, :], other=0.0)
            w = tl.load(w_rows + kk[None, None, :], mask=w_mask & kmask[None, None, :], other=0.0,
                        eviction_policy=EVICT)
        acc += w.to(tl.float32) * a.to(tl.float32)[:, None, :]
    dt = a_ptr.dtype.element_ty
    rw = tl.load(weight_ptr + p, mask=ok, other=0.0)
    y = (tl.sum(acc, axis=2).to(dt).to(tl.float32) * rw[:, None]).to(dt).to(tl.float32)
    y = tl.where(ok[:, None], y, 0.0)
    tl.store(out_ptr + t * H + offs_n, tl.sum(y, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv_ready(x, w13, w2) -> bool:
    """The decode kernels read rows along their contiguous dimension: x and both weights K-contiguous."""
    return x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1


def up_gemv(x, w13, inter, ids, top_k, cfg, pdl=False):
    """``inter[p] = SwiGLU(x[p // K] @ w13[ids[p]]^T)`` for every pair p (ids flat int32)."""
    P, I = inter.shape
    H = x.shape[1]
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    _up_gemv_kernel[(P, triton.cdiv(I, bn))](
        x, w13, inter, ids, I, H, w13.shape[0], x.stride(0), w13.stride(0), w13.stride(1),
        TOPK=top_k, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=H % bk == 0, EVICT=cfg.get("evict", ""),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl))


def down_combine_gemv(inter, w2, out, ids, weights_flat, top_k, cfg, pdl=False):
    """``out[t] = sum_j w[t, j] * (inter[t*K + j] @ w2[ids[t, j]]^T)`` with the tiled path's roundings."""
    T, H = out.shape
    I = inter.shape[1]
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    _down_combine_kernel[(T, triton.cdiv(H, bn))](
        inter, w2, out, ids, weights_flat, H, I, w2.shape[0], w2.stride(0), w2.stride(1),
        TOPK=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=bk, EVEN_K=I % bk == 0,
        EVICT=cfg.get("evict", ""),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl))
