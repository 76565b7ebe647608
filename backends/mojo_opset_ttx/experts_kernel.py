"""Grouped SwiGLU experts: two grouped GEMMs over the expert-sorted rows, fp32 accumulation.

``_gate_up``: ``A = silu(X W1_e^T) * (X W3_e^T)`` and ``_down``: ``Y = A W2_e^T``, for each expert's
rows ``[group_ends[e-1], group_ends[e])``.  The numerics follow the reference: each GEMM output is
rounded to the input dtype, SwiGLU is computed in fp32 and rounded.

Work items are (expert, row tile, column tile) triples.  Their number depends on the routing, which
the host never reads: every program walks the experts in order, reading each group's end on the
device, and takes the items whose global index is congruent to its program id (a persistent 1-D
grid of one program per AI core).  Experts with no rows contribute no items.  Weight tiles are
loaded as contiguous ``[BLOCK_N, BLOCK_K]`` row tiles and transposed in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .platform import interpreter_on, needs_int64, num_programs


@triton.jit
def _tile_dot(a_ptr, a_rows, a_ok, lda, b_ptr, b_rows, b_ok, ldb, KDIM, acc,
              BLOCK_K: tl.constexpr, CDTYPE: tl.constexpr, IEEE: tl.constexpr):
    """acc += A[a_rows, :KDIM] @ B[b_rows, :KDIM]^T, both row-major with leading dims lda/ldb."""
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < KDIM
        a = tl.load(a_ptr + a_rows[:, None] * lda + kk[None, :], mask=a_ok[:, None] & km[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * ldb + kk[None, :], mask=b_ok[:, None] & km[None, :], other=0.0)
        # weights may be stored in another dtype: round them to the input dtype as the reference does
        a = a.to(a_ptr.dtype.element_ty).to(CDTYPE)
        b = b.to(a_ptr.dtype.element_ty).to(CDTYPE)
        if IEEE:  # fp32 operands stay fp32 (no TF32 rounding)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _gate_up(x_ptr, ends_ptr, w_ptr, a_ptr, E, H, I,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             CDTYPE: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(I, BLOCK_N)
    start = tl.zeros((), tl.int32)
    seen = tl.zeros((), tl.int32)      # work items of the experts before e
    w_e = w_ptr                        # expert e's weights; a running pointer never overflows int32
    for e in range(E):
        end = tl.load(ends_ptr + e)
        items = tl.cdiv(end - start, BLOCK_M) * n_tiles
        first = (pid - seen % nprog + nprog) % nprog
        for item in range(first, items, nprog):
            rows = start + (item // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = (item % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            rm = rows < end
            cm = cols < I
            if WIDE:
                rows = rows.to(tl.int64)
            g = _tile_dot(x_ptr, rows, rm, H, w_e, cols, cm, H, H,
                          tl.zeros((BLOCK_M, BLOCK_N), tl.float32), BLOCK_K, CDTYPE, IEEE)
            u = _tile_dot(x_ptr, rows, rm, H, w_e, cols + I, cm, H, H,
                          tl.zeros((BLOCK_M, BLOCK_N), tl.float32), BLOCK_K, CDTYPE, IEEE)
            g = g.to(a_ptr.dtype.element_ty).to(tl.float32)
            u = u.to(a_ptr.dtype.element_ty).to(tl.float32)
            act = g / (1.0 + tl.exp(-g)) * u
            tl.store(a_ptr + rows[:, None] * I + cols[None, :], act.to(a_ptr.dtype.element_ty),
                     mask=rm[:, None] & cm[None, :])
        seen += items
        start = end
        w_e += 2 * I * H


@triton.jit
def _down(a_ptr, ends_ptr, w_ptr, y_ptr, E, H, I,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          CDTYPE: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(H, BLOCK_N)
    start = tl.zeros((), tl.int32)
    seen = tl.zeros((), tl.int32)
    w_e = w_ptr
    for e in range(E):
        end = tl.load(ends_ptr + e)
        items = tl.cdiv(end - start, BLOCK_M) * n_tiles
        first = (pid - seen % nprog + nprog) % nprog
        for item in range(first, items, nprog):
            rows = start + (item // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = (item % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            rm = rows < end
            cm = cols < H
            if WIDE:
                rows = rows.to(tl.int64)
            acc = _tile_dot(a_ptr, rows, rm, I, w_e, cols, cm, I, I,
                            tl.zeros((BLOCK_M, BLOCK_N), tl.float32), BLOCK_K, CDTYPE, IEEE)
            tl.store(y_ptr + rows[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=rm[:, None] & cm[None, :])
        seen += items
        start = end
        w_e += H * I


def _config(dtype: torch.dtype):
    """Tile sizes and the in-kernel compute dtype for ``tl.dot``."""
    interp = interpreter_on()
    # bf16 tl.dot is wrong in the interpreter: upcast there (bf16 products are exact in fp32)
    cdtype = tl.float32 if dtype == torch.float32 or (interp and dtype == torch.bfloat16) else (
        tl.float16 if dtype == torch.float16 else tl.bfloat16)
    blocks = (16, 32, 32) if interp else (64, 64, 64)  # 64x64 tiles fit the 192 KB buffer with room
    return blocks, cdtype, cdtype == tl.float32


def experts(permuted_x: torch.Tensor, group_ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """``[R, H]`` in permuted_x's dtype; rows past ``group_ends[-1]`` are zero."""
    x = permuted_x.contiguous()
    R, H = x.shape
    E, I = w13.shape[0], w2.shape[2]
    ends = group_ends.to(torch.int32).contiguous()
    y = torch.zeros(R, H, dtype=x.dtype, device=x.device)
    if R == 0 or E == 0 or H == 0 or I == 0:
        return y
    a = torch.empty(R, I, dtype=x.dtype, device=x.device)
    (bm, bn, bk), cdtype, ieee = _config(x.dtype)
    wide = needs_int64(R * max(H, I))
    # an upper bound on the work items, to size the grid without reading the routing
    upper = (triton.cdiv(R, bm) + E) * triton.cdiv(max(H, I), bn)
    grid = (num_programs(x.device, upper, cube=True),)
    _gate_up[grid](x, ends, w13, a, E, H, I, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                   CDTYPE=cdtype, IEEE=ieee, WIDE=wide)
    _down[grid](a, ends, w2, y, E, H, I, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                CDTYPE=cdtype, IEEE=ieee, WIDE=wide)
    return y
