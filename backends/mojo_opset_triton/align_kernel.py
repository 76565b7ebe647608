"""Align/permute: expert-sorted, block-aligned pair ids on the device, with no host sync.

Three launches, each deterministic (no atomics), so the order is stable in the pair index
``p = t*K + j`` exactly as the reference sort:

1. ``_histogram_kernel``: per chunk of pairs (one or a few tiles), the count of each expert; it also
   fills the row-source buffer with -1 (padding) so the later scatter only writes real rows.
2. ``_scan_kernel`` (one program): per-expert totals, padded group ends (the ``offs`` of a grouped
   GEMM), each chunk's start inside each expert's group, and the expert of every GEMM row block
   (-1 past the last group, so those blocks exit at once).
3. ``_scatter_kernel``: a pair's row = its expert's group start + its chunk's offset + its rank
   among the equal ids before it in the chunk (tile by tile, with running per-expert counts);
   writes ``row_src[row] = p`` and ``pair_row[p] = row``.

Ids outside [0, E) are never placed (their ``pair_row`` is -1), so no index ever goes out of range.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import chain_start, launch_options

MAX_EXPERTS = 1024


@triton.jit
def _histogram_kernel(ids_ptr, P, SUBS, counts_ptr, row_src_ptr, R, E,
                      CHUNK: tl.constexpr, BE: tl.constexpr, FILL: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(P, CHUNK * SUBS)
    if pid < n_chunks:
        ex = tl.arange(0, BE)
        total = tl.zeros([BE], dtype=tl.int32)
        for sub in range(SUBS):
            offs = (pid * SUBS + sub) * CHUNK + tl.arange(0, CHUNK)
            e = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
            hit = (e[:, None] == ex[None, :]) & (offs < P)[:, None]
            total += tl.sum(hit.to(tl.int32), axis=0)
        tl.store(counts_ptr + pid * E + ex, total, mask=ex < E)
    fo = pid.to(tl.int64) * FILL + tl.arange(0, FILL)
    tl.store(row_src_ptr + fo, tl.full([FILL], -1, tl.int32), mask=fo < R)


@triton.jit
def _scan_kernel(counts_ptr, n_chunks, E, align, tpe_ptr, ends_ptr, base_ptr, block_expert_ptr, n_blocks,
                 BLOCK_M: tl.constexpr, BE: tl.constexpr, CH: tl.constexpr, BB: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    ex = tl.arange(0, BE)
    emask = ex < E
    cr = tl.arange(0, CH)
    total = tl.zeros([BE], dtype=tl.int32)
    for c0 in range(0, n_chunks, CH):
        m = ((c0 + cr) < n_chunks)[:, None] & emask[None, :]
        blk = tl.load(counts_ptr + (c0 + cr)[:, None] * E + ex[None, :], mask=m, other=0)
        total += tl.sum(blk, axis=0)
    padded = (total + align - 1) // align * align
    ends = tl.cumsum(padded, axis=0)
    tl.store(tpe_ptr + ex, total, mask=emask)
    tl.store(ends_ptr + ex, ends, mask=emask)
    running = ends - padded                                   # group starts
    for c0 in range(0, n_chunks, CH):
        m = ((c0 + cr) < n_chunks)[:, None] & emask[None, :]
        blk = tl.load(counts_ptr + (c0 + cr)[:, None] * E + ex[None, :], mask=m, other=0)
        excl = tl.cumsum(blk, axis=0) - blk + running[None, :]
        tl.store(base_ptr + (c0 + cr)[:, None] * E + ex[None, :], excl, mask=m)
        running += tl.sum(blk, axis=0)
    # expert of each GEMM row block: the number of groups ending at or before its first row
    br = tl.arange(0, BB)
    ends_m = tl.where(emask, ends, 2147483647)
    total_rows = tl.max(tl.where(emask, ends, 0), axis=0)
    for b0 in range(0, n_blocks, BB):
        b = b0 + br
        row = b * BLOCK_M
        e = tl.sum((ends_m[None, :] <= row[:, None]).to(tl.int32), axis=1)
        e = tl.where(row < total_rows, e, -1)
        tl.store(block_expert_ptr + b, e, mask=b < n_blocks)


@triton.jit
def _scatter_kernel(ids_ptr, P, SUBS, E, base_ptr, row_src_ptr, pair_row_ptr, CHUNK: tl.constexpr,
                    BE: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    pid = tl.program_id(0)
    r = tl.arange(0, CHUNK)
    ex = tl.arange(0, BE)
    running = tl.load(base_ptr + pid * E + ex, mask=ex < E, other=0)   # next row of each expert's group
    for sub in range(SUBS):
        offs = (pid * SUBS + sub) * CHUNK + r
        inb = offs < P
        e = tl.load(ids_ptr + offs, mask=inb, other=-1)
        ok = inb & (e >= 0) & (e < E)
        hit = (e[:, None] == ex[None, :]) & ok[:, None]
        before = (e[:, None] == e[None, :]) & (r[None, :] < r[:, None])
        rank = tl.sum(before.to(tl.int32), axis=1)
        dest = tl.sum(tl.where(hit, running[None, :], 0), axis=1) + rank
        tl.store(row_src_ptr + dest, offs, mask=ok)
        tl.store(pair_row_ptr + offs, tl.where(ok, dest, -1), mask=inb)
        running += tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _align_small_kernel(ids_ptr, P, E, align, tpe_ptr, ends_ptr, row_src_ptr, R, pair_row_ptr,
                        block_expert_ptr, n_blocks, BLOCK_M: tl.constexpr, BP: tl.constexpr, BE: tl.constexpr,
                        BR: tl.constexpr, FILL: tl.constexpr, PDL: tl.constexpr):
    """All three steps in one program when every pair fits one tile (decode sizes: one launch)."""
    chain_start(PDL)
    r = tl.arange(0, BP)
    inb = r < P
    e = tl.load(ids_ptr + r, mask=inb, other=-1)
    ok = inb & (e >= 0) & (e < E)
    ex = tl.arange(0, BE)
    emask = ex < E
    hit = (e[:, None] == ex[None, :]) & ok[:, None]
    total = tl.sum(hit.to(tl.int32), axis=0)
    padded = (total + align - 1) // align * align
    ends = tl.cumsum(padded, axis=0)
    tl.store(tpe_ptr + ex, total, mask=emask)
    tl.store(ends_ptr + ex, ends, mask=emask)
    start = tl.sum(tl.where(hit, (ends - padded)[None, :], 0), axis=1)
    rank = tl.sum(((e[:, None] == e[None, :]) & (r[None, :] < r[:, None])).to(tl.int32), axis=1)
    dest = tl.where(ok, start + rank, -1)
    tl.store(pair_row_ptr + r, dest, mask=inb)
    # every row padding first, then each pair's row: the barrier orders a row's two writes (a
    # search of each row's pair instead costs rows x pairs compares, 50-70 us in one program)
    fr = tl.arange(0, FILL)
    for r0 in range(0, R, FILL):
        row = r0 + fr
        tl.store(row_src_ptr + row, tl.full([FILL], -1, tl.int32), mask=row < R)
    tl.debug_barrier()
    tl.store(row_src_ptr + dest, r, mask=ok)
    rr = tl.arange(0, BR)
    ends_m = tl.where(emask, ends, 2147483647)
    total_rows = tl.max(tl.where(emask, ends, 0), axis=0)
    for b0 in range(0, n_blocks, BR):
        b = b0 + rr
        brow = b * BLOCK_M
        be = tl.sum((ends_m[None, :] <= brow[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(brow < total_rows, be, -1), mask=b < n_blocks)


SMALL_TILE = 32768  # pairs x experts of the one-program path
MAX_CHUNKS = 64     # chunks of the three-launch path (each a program of the histogram and the scatter)


def _warps(tile: int) -> int:
    """Warps for a program holding a ``tile``-element one-hot block: at most 64 elements per thread
    (4 warps on a 32K-element tile keep 256 per thread, spilled to local memory)."""
    return max(4, min(16, tile // 2048))


def _chunk(num_experts: int) -> int:
    """Pairs per histogram chunk: keeps the [chunk, experts] one-hot tile near 16K elements."""
    be = triton.next_power_of_2(num_experts)
    return max(16, min(128, 16384 // be))


def gemm_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the block-aligned buffer: the worst case, bounded by the blocks that can be non-empty."""
    worst = num_pairs + num_experts * (block_m - 1)
    nonempty_blocks = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    return min(worst, nonempty_blocks * block_m)


def row_blocks(ids: torch.Tensor, num_experts: int, block_m: int, one_per_pair: bool, pdl: bool = False):
    """The fused GEMMs' row blocks for int32 ``ids`` ``[T, K]``: ``(rows, row_src, block_expert,
    tokens_per_expert, group_ends)``.  ``one_per_pair`` (one token: its K experts are distinct): block
    b holds pair b alone and its expert is ``ids[b]``, with no align launch (the kernels derive the
    rows, see experts_kernel._row_sources; the counts are then None).  Otherwise the aligned sort.
    ``pdl``: chained launches (pdl.py)."""
    if one_per_pair:
        return ids.numel() * block_m, ids, ids.view(-1), None, None
    rows = gemm_rows(ids.numel(), num_experts, block_m)
    tpe, ends, row_src, _, block_expert = align_pairs(ids, num_experts, block_m, rows, block_m, pdl)
    return rows, row_src, block_expert, tpe, ends


def align_pairs(topk_ids: torch.Tensor, num_experts: int, align: int, rows: int, block_m: int = 0,
                pdl: bool = False):
    """Sort the pairs of ``topk_ids`` by expert (stable), padding each group to ``align``.

    Returns (tokens_per_expert int32 [E], group_ends int32 [E], row_src int32 [rows],
    pair_row int32 [P], block_expert int32 [rows // block_m] or None)."""
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    flat = flat.contiguous()
    P, E, dev = flat.numel(), num_experts, flat.device
    tpe = torch.empty(E, dtype=torch.int32, device=dev)
    ends = torch.empty(E, dtype=torch.int32, device=dev)
    row_src = torch.empty(rows, dtype=torch.int32, device=dev)
    pair_row = torch.empty(P, dtype=torch.int32, device=dev)
    n_blocks = rows // block_m if block_m else 0
    block_expert = torch.empty(max(n_blocks, 1), dtype=torch.int32, device=dev)
    BE = triton.next_power_of_2(E)
    BP = triton.next_power_of_2(max(P, 1))
    if BP * BE <= SMALL_TILE and BP <= 256:
        BR = max(16, min(128, 8192 // BE))
        _align_small_kernel[(1,)](flat, P, E, align, tpe, ends, row_src, rows, pair_row, block_expert, n_blocks,
                                  BLOCK_M=max(block_m, 1), BP=BP, BE=BE, BR=BR, FILL=1024,
                                  num_warps=_warps(BP * BE), **launch_options(pdl))
        return tpe, ends, row_src, pair_row, (block_expert[:n_blocks] if block_m else None)
    CHUNK = _chunk(E)
    # a program takes SUBS tiles of CHUNK pairs, so that the one-program scan walks at most
    # MAX_CHUNKS chunks (it took 130 us over 1,024 chunks of DeepSeek-V3's 65,536 pairs)
    subs = triton.cdiv(triton.cdiv(P, CHUNK), MAX_CHUNKS)
    n_chunks = triton.cdiv(P, CHUNK * subs)
    counts = torch.empty(max(n_chunks, 1) * E, dtype=torch.int32, device=dev)
    base = torch.empty_like(counts)
    FILL = 1024
    grid = max(n_chunks, triton.cdiv(rows, FILL), 1)
    _histogram_kernel[(grid,)](flat, P, subs, counts, row_src, rows, E, CHUNK=CHUNK, BE=BE, FILL=FILL,
                               num_warps=_warps(CHUNK * BE), **launch_options(pdl))
    CH = max(1, min(16, 4096 // BE))
    _scan_kernel[(1,)](counts, n_chunks, E, align, tpe, ends, base, block_expert, n_blocks,
                       BLOCK_M=max(block_m, 1), BE=BE, CH=CH, BB=max(1, min(64, 8192 // BE)), num_warps=4,
                       **launch_options(pdl))
    if n_chunks:
        _scatter_kernel[(n_chunks,)](flat, P, subs, E, base, row_src, pair_row, CHUNK=CHUNK, BE=BE,
                                     num_warps=_warps(CHUNK * BE), **launch_options(pdl))
    return tpe, ends, row_src, pair_row, (block_expert[:n_blocks] if block_m else None)


@triton.jit
def _gather_rows_kernel(x_ptr, stride_xt, stride_xh, row_src_ptr, out_ptr, H, TOPK,
                        BH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    src = tl.load(row_src_ptr + r)
    h = hb * BH + tl.arange(0, BH)
    tok = tl.where(src >= 0, src // TOPK, 0).to(tl.int64)
    hmask = h < H
    # the scalar condition joins the block through a boolean block: Triton 3.9's interpreter
    # rejects a mask made by splatting a scalar comparison (the compiled code is the same)
    v = tl.load(x_ptr + tok * stride_xt + h * stride_xh, mask=hmask & (tl.zeros_like(hmask) | (src >= 0)),
                other=0.0)
    tl.store(out_ptr + r * H + h, v, mask=hmask)


def permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int):
    """The ``moe_permute`` op (contract: mojo_opset.contract.PermuteCall)."""
    T, K = topk_ids.shape
    P, H = T * K, x.shape[1]
    R = P if align == 1 else P + num_experts * (align - 1)
    tpe, ends, row_src, pair_row, _ = align_pairs(topk_ids, num_experts, align, R)
    out = torch.empty(R, H, dtype=x.dtype, device=x.device)
    if R and H:
        BH = min(1024, triton.next_power_of_2(H))
        _gather_rows_kernel[(R, triton.cdiv(H, BH))](x, x.stride(0), x.stride(1), row_src, out, H, K,
                                                    BH=BH, num_warps=4)
    return out, tpe, ends, row_src, pair_row
