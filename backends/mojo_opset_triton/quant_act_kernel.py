"""Dynamic activation quantization (SPEC §3.6): int8 per row, float8_e4m3 per row and 128 columns.

The GEMMs of ``quant_gemm`` read 8-bit activations quantized here, once per matrix.  The results are
the reference's bit for bit: ``s = max(amax, 1e-12) / qmax`` and ``x / s`` as correctly rounded
divisions, round half to even, clamp.  A NaN counts as an infinite amax: the row's scale becomes inf,
its codes zeros, and the GEMM's ``acc * s`` turns that into NaN, as the reference's NaN scale does.

``deinterleave``: for the int4 GEMMs, a row is written with its even columns first, then its odd
columns (``de_interleave_rows`` does the same for float rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import chain_start, launch_options

INT8_MAX = 127.0
FP8_MAX = 448.0
FP8_GROUP = 128
# columns per program of the int8 row quantization: a few elements per thread, since each correctly
# rounded division is a long dependent sequence (1024-column programs took 8 us for a decode step)
ROW_CHUNK = 512
# at most this many elements read by the one-launch path, whose every chunk program reads its whole
# row (C x the input); beyond it, chunk maxima first, then the codes (two launches)
REREAD_ELEMENTS = 1 << 21
# columns per load of that whole-row read: its loads are independent, so wide steps keep few load
# latencies in a row (Mixtral-8x7B's 14336-column intermediate in 512-column steps: 28 latencies; with
# the token's row, 18 us of a 110 us one-token w8a8 call on an H200)
AMAX_STEP = 4096
# from this many rows on, a program quantizes a whole row (ROW_BLOCK rows, two passes: the amax, then
# the codes): enough programs without splitting rows, one launch (on an H200: 65536 x 768 rows
# 193 -> 108 us, 16384 x 14336 634 -> 285 us)
ROW_BLOCK_MIN_ROWS = 256
ROW_BLOCK = 1
ROW_STEP = 2048     # columns per pass step of those programs: 2048 when it divides K, else 1024
FP8_ROW_BLOCK = 32  # rows per program of the fp8 quantization from ROW_BLOCK_MIN_ROWS rows on (else 8)


@triton.jit
def round_half_even(v):
    # adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to an integer,
    # ties to even (torch.round); libdevice's rint is not available in the interpreter
    return (v + 12582912.0) - 12582912.0


@triton.jit
def row_amax(a):
    """Per-row max |a| of an fp32 tile ``[M, K]`` (NaN counts as inf)."""
    return tl.max(tl.where(a == a, tl.abs(a), float("inf")), axis=1)


@triton.jit
def amax_to_scale(amax, QMAX: tl.constexpr):
    return tl.math.div_rn(tl.maximum(amax, 1e-12), QMAX)


@triton.jit
def quant_int8(a, s):
    """fp32 tile ``[M, K]`` and row scales ``[M]`` -> int8 codes in [-127, 127]."""
    v = tl.math.div_rn(a, s[:, None])
    v = tl.where(v == v, v, 0.0)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return round_half_even(v).to(tl.int8)


@triton.jit
def quant_fp8(a, s):
    """fp32 tile ``[M, 128]`` and row scales ``[M]`` -> float8_e4m3 codes (the cast rounds to even)."""
    v = tl.math.div_rn(a, s[:, None])
    v = tl.where(v == v, v, 0.0)
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    return v.to(tl.float8e4nv)


@triton.jit
def _dest_cols(cols, K, DEINTERLEAVE: tl.constexpr):
    if DEINTERLEAVE:
        return cols // 2 + (cols % 2) * (K // 2)
    return cols


@triton.jit
def _chunk_amax_kernel(x_ptr, amax_ptr, M, K, C, stride_xm, stride_xk, BM: tl.constexpr, BK: tl.constexpr,
                       PDL: tl.constexpr):
    """``amax[row, c]``: max |x| of each row over column chunk c (NaN counts as inf)."""
    chain_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rmask = rows < M
    a = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=rmask[:, None] & (cols < K)[None, :], other=0.0)
    tl.store(amax_ptr + rows * C + tl.program_id(1), row_amax(a.to(tl.float32)), mask=rmask)


@triton.jit
def _rows_int8_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, M, K, C, stride_xm, stride_xk,
                      BM: tl.constexpr, BK: tl.constexpr, CP: tl.constexpr, RB: tl.constexpr,
                      DEINTERLEAVE: tl.constexpr, PDL: tl.constexpr):
    """Codes of one column chunk of BM rows; the row's amax from the chunk maxima (``CP`` > 1), from
    the chunk itself (``CP`` == 1: one chunk per row) or from the whole row read by every chunk's
    program, ``RB`` columns per load (``CP`` == 0: short inputs, one launch instead of two)."""
    chain_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    chunk = tl.program_id(1)
    cols = chunk * BK + tl.arange(0, BK)
    rmask = rows < M
    m = rmask[:, None] & (cols < K)[None, :]
    a = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
    if CP == 1:
        amax = row_amax(a)
    elif CP == 0:
        amax = tl.zeros([BM], dtype=tl.float32)
        for c0 in range(0, K, RB):
            cc = c0 + tl.arange(0, RB)
            part = tl.load(x_ptr + rows[:, None] * stride_xm + cc[None, :] * stride_xk,
                           mask=rmask[:, None] & (cc < K)[None, :], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, row_amax(part))
    else:
        cs = tl.arange(0, CP)
        part = tl.load(amax_ptr + rows[:, None] * C + cs[None, :], mask=rmask[:, None] & (cs < C)[None, :],
                       other=0.0)
        amax = tl.max(part, axis=1)
    s = amax_to_scale(amax, 127.0)
    if chunk == 0:
        tl.store(s_ptr + rows, s, mask=rmask)
    dst = _dest_cols(cols, K, DEINTERLEAVE)
    tl.store(q_ptr + rows[:, None] * K + dst[None, :], quant_int8(a, s), mask=m)


@triton.jit
def _row_block_int8_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, BM: tl.constexpr, BK: tl.constexpr,
                           DEINTERLEAVE: tl.constexpr, PDL: tl.constexpr):
    """Codes and scales of BM whole rows: the amax over the row's column steps, then its codes (the
    second pass reads the rows back from L2)."""
    chain_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < M
    amax = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, K, BK):
        cols = c0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=rmask[:, None] & (cols < K)[None, :], other=0.0)
        amax = tl.maximum(amax, row_amax(a.to(tl.float32)))
    s = amax_to_scale(amax, 127.0)
    tl.store(s_ptr + rows, s, mask=rmask)
    for c0 in range(0, K, BK):
        cols = c0 + tl.arange(0, BK)
        m = rmask[:, None] & (cols < K)[None, :]
        a = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=m, other=0.0)
        dst = _dest_cols(cols, K, DEINTERLEAVE)
        tl.store(q_ptr + rows[:, None] * K + dst[None, :], quant_int8(a.to(tl.float32), s), mask=m)


@triton.jit
def _deinterleave_kernel(x_ptr, y_ptr, M, K, stride_xm, stride_xk, BM: tl.constexpr, BK: tl.constexpr,
                         PDL: tl.constexpr):
    chain_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (rows < M)[:, None] & (cols < K)[None, :]
    v = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=m)
    tl.store(y_ptr + rows[:, None] * K + _dest_cols(cols, K, True)[None, :], v, mask=m)


@triton.jit
def _rows_fp8_kernel(x_ptr, q_ptr, s_ptr, M, K, KB, stride_xm, stride_xk, BM: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    kb = tl.program_id(1)
    rmask = rows < M
    cols = kb * 128 + tl.arange(0, 128)
    a = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=rmask[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    s = amax_to_scale(row_amax(a), 448.0)
    tl.store(s_ptr + rows * KB + kb, s, mask=rmask)
    tl.store(q_ptr + rows[:, None] * (KB * 128) + cols[None, :], quant_fp8(a, s), mask=rmask[:, None])


def quantize_rows_int8(x: torch.Tensor, deinterleave: bool = False, pdl: bool = False):
    """``[M, K]`` float -> (int8 codes ``[M, K]``, fp32 scales ``[M]``), as the reference's
    ``quantize_tokens_int8`` (codes de-interleaved when asked; K even).

    Many rows (``ROW_BLOCK_MIN_ROWS``): a program per ``ROW_BLOCK`` whole rows.  Fewer rows: every
    chunk of a row is its own program, since a decode step's few long rows (Mixtral's 14336-column
    intermediate) would otherwise be a few programs walking their rows twice (about 100 us on an H200).
    A chunk's program needs the row's amax: on short inputs it reads the whole row itself (one
    launch), on longer ones the chunks' maxima come from a first launch.  ``pdl``: chained launches
    (pdl.py)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, s
    if M >= ROW_BLOCK_MIN_ROWS:
        BK = min(ROW_STEP if K % ROW_STEP == 0 else ROW_STEP // 2, triton.next_power_of_2(max(K, 16)))
        _row_block_int8_kernel[(triton.cdiv(M, ROW_BLOCK),)](x, q, s, M, K, x.stride(0), x.stride(1), BM=ROW_BLOCK,
                                                             BK=BK, DEINTERLEAVE=deinterleave, num_warps=4,
                                                             **launch_options(pdl))
        return q, s
    BM = 1
    BK = min(ROW_CHUNK, triton.next_power_of_2(max(K, 16)))
    C = triton.cdiv(K, BK)
    grid = (triton.cdiv(M, BM), C)
    amax, cp, rb = s, 1, BK
    if C > 1 and M * K * C <= REREAD_ELEMENTS:
        rb = min(AMAX_STEP, triton.next_power_of_2(K))
        cp = 0      # every program reads its whole row for the amax: one launch (decode sizes)
    elif C > 1:
        amax, cp = torch.empty(M, C, dtype=torch.float32, device=x.device), triton.next_power_of_2(C)
        _chunk_amax_kernel[grid](x, amax, M, K, C, x.stride(0), x.stride(1), BM=BM, BK=BK, num_warps=4,
                                 **launch_options(pdl))
    _rows_int8_kernel[grid](x, q, s, amax, M, K, C, x.stride(0), x.stride(1), BM=BM, BK=BK,
                            CP=cp, RB=rb, DEINTERLEAVE=deinterleave, num_warps=4, **launch_options(pdl))
    return q, s


def quantize_rows_fp8(x: torch.Tensor, pdl: bool = False):
    """``[M, K]`` float -> (float8_e4m3fn codes ``[M, KB*128]`` zero-padded, fp32 scales ``[M, KB]``),
    KB = ceil(K/128), as the reference's ``quantize_tokens_fp8``."""
    M, K = x.shape
    KB = triton.cdiv(K, FP8_GROUP)
    q = torch.empty(M, KB * FP8_GROUP, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, KB, dtype=torch.float32, device=x.device)
    if M and KB:
        BM = FP8_ROW_BLOCK if M >= ROW_BLOCK_MIN_ROWS else 8
        _rows_fp8_kernel[(triton.cdiv(M, BM), KB)](x, q, s, M, K, KB, x.stride(0), x.stride(1), BM=BM,
                                                   num_warps=4, **launch_options(pdl))
    return q, s


def deinterleave_rows(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``[M, K]`` -> ``[M, K]`` with each row's even columns first, then its odd columns (K even)."""
    M, K = x.shape
    y = torch.empty(M, K, dtype=x.dtype, device=x.device)
    if M and K:
        BM, BK = 4, min(1024, triton.next_power_of_2(K))
        _deinterleave_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](x, y, M, K, x.stride(0), x.stride(1),
                                                                      BM=BM, BK=BK, num_warps=4,
                                                                      **launch_options(pdl))
    return y
