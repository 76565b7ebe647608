"""Fused grouped-GEMM SwiGLU experts over expert-sorted, block-aligned rows.

``_up_kernel``: for the row block of one expert, gathers the A rows straight from x at
``pair // K`` (no permuted copy of x), computes the gate and up column blocks of ``x @ w13[e]^T``
in two fp32 accumulators and applies SwiGLU in the epilogue; the result goes to the intermediate
buffer in sorted-row order.  ``_down_kernel``: ``inter @ w2[e]^T`` with the router weight of each
pair applied in the epilogue, stored per pair (``[T*K, H]``), or per token when K == 1.
The combine is then a plain deterministic reduction over K (``combine.py``).

Rounding follows the reference (GEMM outputs rounded to the input dtype, SwiGLU in fp32).
Offsets that can pass 2^31 (token * H, expert * N * K, row * N) are computed in int64.

``ROWDOT`` (the deterministic mode under the interpreter): the tile product as an explicit sum over
k.  On a GPU every row of a ``tl.dot`` tile is summed the same way; the interpreter's ``tl.dot`` is
numpy's matmul, whose BLAS rounds a row differently depending on its position in the tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pdl import chain_start, launch_options


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each column block while it is hot in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _row_sources(row_src_ptr, offs_m, pid_m, BLOCK_M: tl.constexpr, PAIR_ROWS: tl.constexpr):
    """The pair of each row of a row block (-1: padding).  ``PAIR_ROWS``: block b holds pair b
    alone, in its first row, and its expert is ``topk_ids[b]`` (no align step: decode sizes)."""
    if PAIR_ROWS:
        return tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, -1)
    return tl.load(row_src_ptr + offs_m)


@triton.jit(do_not_specialize=["num_m"])
def _up_kernel(x_ptr, w_ptr, out_ptr, row_src_ptr, block_expert_ptr, num_m, I, H, TOPK, E,
               stride_xt, stride_xh, stride_we, stride_wn, stride_wk, h_ptr, h_shift_ptr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
               STORE_H: tl.constexpr, ROWDOT: tl.constexpr, PAIR_ROWS: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if (e < 0) | (e >= E):
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src = _row_sources(row_src_ptr, offs_m, pid_m, BLOCK_M, PAIR_ROWS)
    valid_m = src >= 0
    tok = tl.where(valid_m, src // TOPK, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_base = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
    g_ptrs = w_base + offs_n.to(tl.int64)[None, :] * stride_wn
    u_ptrs = w_base + (offs_n.to(tl.int64) + I)[None, :] * stride_wn   # up rows follow the gate rows
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid_m[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=mask_n[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            kmask = offs_k < H - k * BLOCK_K
            a = tl.load(a_ptrs, mask=valid_m[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        if ROWDOT:
            acc_g += tl.sum(a[:, :, None] * bg[None, :, :], axis=1)
            acc_u += tl.sum(a[:, :, None] * bu[None, :, :], axis=1)
        elif IEEE:
            acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    dt = out_ptr.dtype.element_ty
    gate = acc_g.to(dt).to(tl.float32)
    up = acc_u.to(dt).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    o_ptrs = out_ptr + offs_m[:, None] * I + offs_n[None, :]
    tl.store(o_ptrs, act.to(dt), mask=mask_n[None, :])
    if STORE_H:
        # training: the pre-activation [gate | up] for the backward, in compact sorted rows
        # (no block padding: row = padded row - the expert's shift)
        crow = offs_m - tl.load(h_shift_ptr + e).to(tl.int64)
        h_ptrs = h_ptr + crow[:, None] * (2 * I) + offs_n[None, :]
        hmask = valid_m[:, None] & mask_n[None, :]
        tl.store(h_ptrs, gate.to(dt), mask=hmask)
        tl.store(h_ptrs + I, up.to(dt), mask=hmask)


@triton.jit(do_not_specialize=["num_m"])
def _down_kernel(a_ptr, w_ptr, y_ptr, row_src_ptr, block_expert_ptr, weight_ptr, num_m, H, I, TOPK, E,
                 stride_we, stride_wn, stride_wk, stride_yr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 PER_TOKEN: tl.constexpr, ROWDOT: tl.constexpr, PAIR_ROWS: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, num_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if (e < 0) | (e >= E):
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src = _row_sources(row_src_ptr, offs_m, pid_m, BLOCK_M, PAIR_ROWS)
    valid_m = src >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * I + offs_k[None, :]
    b_ptrs = (w_ptr + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
              + offs_k[:, None] * stride_wk)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(I, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            kmask = offs_k < I - k * BLOCK_K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ROWDOT:
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    dt = a_ptr.dtype.element_ty
    w = tl.load(weight_ptr + src, mask=valid_m, other=0.0)
    y = acc.to(dt).to(tl.float32) * w[:, None]
    dst = src.to(tl.int64)
    if PER_TOKEN:
        dst = dst // TOPK
    tl.store(y_ptr + dst[:, None] * stride_yr + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=valid_m[:, None] & mask_n[None, :])


def up_proj(x, w13, inter, row_src, block_expert, top_k, cfg, upcast, ieee, h=None, h_shift=None, rowdot=False,
            pair_rows=False, pdl=False):
    """``h``/``h_shift`` (training): also store the pre-activation in compact rows (see _up_kernel);
    ``rowdot``: see the module's docstring; ``pair_rows``: one pair per row block, ``block_expert``
    is then the flat int32 ids and ``row_src`` is not read (see ``_row_sources``); ``pdl``: a
    chained launch (pdl.py)."""
    R = inter.shape[0]
    I = inter.shape[1]
    H = x.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m = R // bm
    grid = (num_m * triton.cdiv(I, bn),)
    _up_kernel[grid](x, w13, inter, row_src, block_expert, num_m, I, H, top_k, w13.shape[0],
                     x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
                     inter if h is None else h, block_expert if h_shift is None else h_shift,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=H % bk == 0,
                     UPCAST=upcast, IEEE=ieee, STORE_H=h is not None, ROWDOT=rowdot, PAIR_ROWS=pair_rows,
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl))


def down_proj(inter, w2, y, row_src, block_expert, weights_flat, top_k, cfg, upcast, ieee, per_token, rowdot=False,
              pair_rows=False, pdl=False):
    R, I = inter.shape
    H = w2.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m = R // bm
    grid = (num_m * triton.cdiv(H, bn),)
    _down_kernel[grid](inter, w2, y, row_src, block_expert, weights_flat, num_m, H, I, top_k, w2.shape[0],
                       w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=I % bk == 0,
                       UPCAST=upcast, IEEE=ieee, PER_TOKEN=per_token, ROWDOT=rowdot, PAIR_ROWS=pair_rows,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl))
