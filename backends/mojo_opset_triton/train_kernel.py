"""Triton kernels of the training backward, over compact expert-sorted rows.

The backward keeps one row per placed (token, slot) pair, sorted by expert (stable, as the forward),
with no block padding: group e holds rows ``[offs[e-1], offs[e])``. ``torch._grouped_mm`` and these
kernels share those buffers, so each GEMM can run on either.

* ``_dact_kernel``: ``G = dY @ W2[e]`` with the dY rows gathered from ``grad_out`` by token, and
  the SwiGLU backward in the epilogue: ``dH = swiglu'(h) * (w * G)``, the router weight times the
  activation (``w * a``, the operand of dW2), and per row block the partial ``sum(G * a)`` of
  ``d topk_weights`` (``<dY, a W2^T> = <dY W2, a>``), summed later in a fixed order. ``dH`` may
  be written over ``h`` and ``w * a`` over ``G``: each program reads a tile before it writes it.
* ``_swiglu_grad_kernel``: the same epilogue over a ``G`` computed by ``torch._grouped_mm``;
  ``_swiglu_kernel``: the activation of the forward on ``torch._grouped_mm``.
* ``_dx_kernel``: ``dX = dH @ W13[e]`` per pair row (or per token when K = 1).
* ``_wgrad_kernel``: ``dW[e] = A_e^T B_e`` over the rows of group e (fp32 accumulation, a fixed
  order: no atomics), with A or B gathered from a token-major tensor by the rows' tokens.

The row GEMMs walk the forward's block-aligned tile table (``block_expert``, ``row_src`` of the
padded layout): a block of BLOCK_M padded rows of expert e maps to compact rows ``row - shift[e]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .experts_kernel import _tile_ids


@triton.jit
def _mainloop(a_ptrs, b_ptrs, a_rows, b_cols, Kdim, stride_ak, stride_bk, acc,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += A[rows, :Kdim] @ B[:Kdim, cols], masked rows of A and columns of B read as zeros."""
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, tl.cdiv(Kdim, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=a_rows[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=b_cols[None, :], other=0.0)
        else:
            km = offs_k < Kdim - k * BLOCK_K
            a = tl.load(a_ptrs, mask=a_rows[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=km[:, None] & b_cols[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _swiglu_grad_store(G, crow, src, valid, offs_n, mask_n, pid_n, h_ptr, wt_ptr, dh_ptr, aw_ptr, part_ptr,
                       I, NB):
    """The SwiGLU backward of rows ``crow`` given ``G = dY @ W2`` (fp32, unweighted)."""
    dt = dh_ptr.dtype.element_ty
    m2 = valid[:, None] & mask_n[None, :]
    G = G.to(dt).to(tl.float32)                          # rounded as a GEMM output in the input dtype
    hp = h_ptr + crow[:, None] * (2 * I) + offs_n[None, :]
    g = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    u = tl.load(hp + I, mask=m2, other=0.0).to(tl.float32)
    w = tl.load(wt_ptr + src, mask=valid, other=0.0)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    a = (silu * u).to(dt).to(tl.float32)                 # the forward's activation, recomputed
    tl.store(part_ptr + src.to(tl.int64) * NB + pid_n, tl.sum(G * a, axis=1), mask=valid)
    da = G * w[:, None]
    dg = da * u * sig * (1.0 + g * (1.0 - sig))          # silu'(g) = sig * (1 + g * (1 - sig))
    du = da * silu
    dp = dh_ptr + crow[:, None] * (2 * I) + offs_n[None, :]
    tl.store(dp, dg.to(dt), mask=m2)
    tl.store(dp + I, du.to(dt), mask=m2)
    tl.store(aw_ptr + crow[:, None] * I + offs_n[None, :], (a * w[:, None]).to(dt), mask=m2)


@triton.jit(do_not_specialize=["num_m"])
def _dact_kernel(go_ptr, w2_ptr, h_ptr, wt_ptr, row_src_ptr, block_expert_ptr, shift_ptr, dh_ptr, aw_ptr,
                 part_ptr, num_m, I, H, TOPK, NB, stride_gt, stride_gh, stride_we, stride_wk, stride_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src = tl.load(row_src_ptr + offs_m)
    valid = src >= 0
    tok = tl.where(valid, src // TOPK, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = go_ptr + tok[:, None] * stride_gt + offs_k[None, :] * stride_gh
    b_ptrs = (w2_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
              + offs_n.to(tl.int64)[None, :] * stride_wn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mainloop(a_ptrs, b_ptrs, valid, mask_n, H, stride_gh, stride_wk, acc, BLOCK_K, EVEN_K, UPCAST, IEEE)
    crow = offs_m - tl.load(shift_ptr + e).to(tl.int64)
    _swiglu_grad_store(acc, crow, src, valid, offs_n, mask_n, pid_n, h_ptr, wt_ptr, dh_ptr, aw_ptr, part_ptr,
                       I, NB)


@triton.jit
def _swiglu_grad_kernel(g_ptr, h_ptr, wt_ptr, row_src_ptr, dh_ptr, aw_ptr, part_ptr, P, I, NB,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    crow = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src = tl.load(row_src_ptr + crow, mask=crow < P, other=-1)
    valid = src >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    G = tl.load(g_ptr + crow[:, None] * I + offs_n[None, :], mask=valid[:, None] & mask_n[None, :],
                other=0.0).to(tl.float32)
    _swiglu_grad_store(G, crow, src, valid, offs_n, mask_n, pid_n, h_ptr, wt_ptr, dh_ptr, aw_ptr, part_ptr,
                       I, NB)


@triton.jit
def _swiglu_kernel(h_ptr, a_ptr, P, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """a = silu(gate) * up of h = [gate | up] (fp32 math, GEMM outputs as given)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < P)[:, None] & (cols < I)[None, :]
    hp = h_ptr + rows[:, None] * (2 * I) + cols[None, :]
    g = tl.load(hp, mask=m, other=0.0).to(tl.float32)
    u = tl.load(hp + I, mask=m, other=0.0).to(tl.float32)
    a = g / (1.0 + tl.exp(-g)) * u
    tl.store(a_ptr + rows[:, None] * I + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["num_m"])
def _dx_kernel(dh_ptr, w_ptr, out_ptr, row_src_ptr, block_expert_ptr, shift_ptr, num_m, H, N2, TOPK,
               stride_we, stride_wk, stride_wn, stride_or,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, PER_TOKEN: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, num_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src = tl.load(row_src_ptr + offs_m)
    valid = src >= 0
    crow = offs_m - tl.load(shift_ptr + e).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dh_ptr + crow[:, None] * N2 + offs_k[None, :]
    b_ptrs = (w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
              + offs_n.to(tl.int64)[None, :] * stride_wn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _mainloop(a_ptrs, b_ptrs, valid, mask_n, N2, 1, stride_wk, acc, BLOCK_K, EVEN_K, UPCAST, IEEE)
    dst = src.to(tl.int64)
    if PER_TOKEN:
        dst = dst // TOPK
    tl.store(out_ptr + dst[:, None] * stride_or + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, out_ptr, offs_ptr, row_src_ptr, N, C, TOPK,
                  stride_ar, stride_br, stride_oe, stride_on,
                  GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """out[e, n, c] = sum over the rows r of group e of A[r, n] * B[r, c] (A, B unit column stride)."""
    pid = tl.program_id(0)
    nn = tl.cdiv(N, BLOCK_N)
    nc = tl.cdiv(C, BLOCK_C)
    e = pid // (nn * nc)
    rest = pid % (nn * nc)
    pid_n = rest // nc
    pid_c = rest % nc
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + rr
        rmask = rows < end
        arow = rows.to(tl.int64)
        brow = rows.to(tl.int64)
        if GATHER_A or GATHER_B:
            tok = (tl.load(row_src_ptr + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
            if GATHER_A:
                arow = tok
            if GATHER_B:
                brow = tok
        a = tl.load(a_ptr + arow[:, None] * stride_ar + offs_n[None, :], mask=rmask[:, None] & mask_n[None, :],
                    other=0.0)
        b = tl.load(b_ptr + brow[:, None] * stride_br + offs_c[None, :], mask=rmask[:, None] & mask_c[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_n.to(tl.int64)[:, None] * stride_on + offs_c[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


# --------------------------------------------------------------------------- launchers

def dact(go, w2, h, wt, row_src, block_expert, shift, dh, aw, part, top_k, cfg, upcast, ieee):
    R, I, H = row_src.shape[0], w2.shape[2], w2.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m = R // bm
    _dact_kernel[(num_m * triton.cdiv(I, bn),)](
        go, w2, h, wt, row_src, block_expert, shift, dh, aw, part, num_m, I, H, top_k, part.shape[1],
        go.stride(0), go.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=H % bk == 0, UPCAST=upcast,
        IEEE=ieee, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def swiglu_grad(G, h, wt, row_src, dh, aw, part, block_n):
    P, I = G.shape
    bm = 32
    _swiglu_grad_kernel[(triton.cdiv(P, bm), triton.cdiv(I, block_n))](
        G, h, wt, row_src, dh, aw, part, P, I, part.shape[1], BLOCK_M=bm, BLOCK_N=block_n, num_warps=4)


def swiglu(h):
    P, I = h.shape[0], h.shape[1] // 2
    a = torch.empty(P, I, dtype=h.dtype, device=h.device)
    if P and I:
        bm, bn = 32, 128
        _swiglu_kernel[(triton.cdiv(P, bm), triton.cdiv(I, bn))](h, a, P, I, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return a


def dx_rows(dh, w13, out, row_src, block_expert, shift, top_k, cfg, upcast, ieee, per_token):
    R, N2, H = row_src.shape[0], dh.shape[1], w13.shape[2]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m = R // bm
    _dx_kernel[(num_m * triton.cdiv(H, bn),)](
        dh, w13, out, row_src, block_expert, shift, num_m, H, N2, top_k,
        w13.stride(0), w13.stride(1), w13.stride(2), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=N2 % bk == 0, UPCAST=upcast,
        IEEE=ieee, PER_TOKEN=per_token, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def wgrad(a, b, out, offs, row_src, top_k, gather_a, gather_b, cfg, upcast, ieee):
    """out[e] = A_e^T B_e; ``a``/``b`` are row-major with unit column stride; ``out`` is [E, N, C]."""
    E, N, C = out.shape
    bn, bc = cfg["BLOCK_N"], cfg["BLOCK_C"]
    _wgrad_kernel[(E * triton.cdiv(N, bn) * triton.cdiv(C, bc),)](
        a, b, out, offs, row_src, N, C, top_k, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        GATHER_A=gather_a, GATHER_B=gather_b, BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=cfg["BLOCK_R"], UPCAST=upcast,
        IEEE=ieee, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
