"""Permute kernels: a stable counting sort of the T*K (token, slot) pairs by expert, no atomics.

triton-ascend has no integer ``tl.sort`` and its atomics are slow, so the order is built in three
deterministic passes over contiguous chunks of the flat pair index p = t*K + j:

1. ``_chunk_count``: per chunk (a few per program, each a run of small sub-blocks), how many of its
   pairs go to each expert (``[chunks, E]``).
2. ``_scan``: one program turns those counts into each chunk's first row per expert: expert totals
   (``tokens_per_expert``), padded to ``align``, summed into ``group_ends``, plus the running count
   of the chunks before.
3. ``_scatter``: each pair's row = its expert's next free row in the chunk (the chunk's base,
   advanced after each sub-block) + the number of earlier pairs of its sub-block with that expert;
   it writes ``pair_row``, ``row_src`` and copies the token's row of x as contiguous ``BLOCK_H``
   tiles.

Chunks are visited in order by the scan and sub-blocks in order inside a chunk, so the order is
stable in p.  Comparisons of ids are done on fp32 copies (exact below 2**24), which triton-ascend keeps
vectorised where int32 comparisons degrade to scalar code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .platform import needs_int64, num_programs

MAX_EXPERTS = 4096
TILE_ELEMS = 8192   # sub-block size = TILE_ELEMS // next_pow2(E), kept within [16, 128]
CHUNKS_PER_PROGRAM = 4


@triton.jit
def _chunk_count(ids_ptr, counts_ptr, P, E, num_chunks, subs,
                 SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    colf = cols.to(tl.float32)
    for c in range(pid, num_chunks, nprog):
        cnt = tl.zeros((BLOCK_E,), tl.int32)
        for s in range(subs):
            p = (c * subs + s) * SUB + tl.arange(0, SUB)
            idf = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.float32)
            cnt += tl.sum((idf[:, None] == colf[None, :]).to(tl.int32), axis=0)
        tl.store(counts_ptr + c * E + cols, cnt, mask=cols < E)


@triton.jit
def _scan(counts_ptr, base_ptr, tpe_ptr, ends_ptr, E, num_chunks, ALIGN: tl.constexpr,
          BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    ok = cols < E
    total = tl.zeros((BLOCK_E,), tl.int32)
    for c in range(num_chunks):
        total += tl.load(counts_ptr + c * E + cols, mask=ok, other=0)
    padded = (total + (ALIGN - 1)) // ALIGN * ALIGN
    ends = tl.cumsum(padded, axis=0)
    tl.store(tpe_ptr + cols, total, mask=ok)
    tl.store(ends_ptr + cols, ends, mask=ok)
    run = ends - padded
    for c in range(num_chunks):
        cnt = tl.load(counts_ptr + c * E + cols, mask=ok, other=0)
        tl.store(base_ptr + c * E + cols, run, mask=ok)
        run += cnt


@triton.jit
def _scatter_block(x_ptr, ids_ptr, out_ptr, row_src_ptr, pair_row_ptr, p, localf, next_row, colf,
                   P, E, H, K, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """Place the pairs ``p`` (one sub-block) given each expert's next free row; returns the next
    free rows after them."""
    pm = p < P
    ids = tl.load(ids_ptr + p, mask=pm, other=-1)
    idf = ids.to(tl.float32)
    valid = pm & (ids >= 0) & (ids < E)
    hit = idf[:, None] == colf[None, :]
    # stable rank inside the sub-block: earlier pairs with the same expert
    same = (idf[:, None] == idf[None, :]) & (localf[None, :] < localf[:, None])
    dest = tl.sum(tl.where(hit, next_row[None, :], 0), axis=1) + tl.sum(same.to(tl.int32), axis=1)
    tl.store(pair_row_ptr + p, dest, mask=valid)
    tl.store(row_src_ptr + dest, p, mask=valid)
    tok = p // K
    if WIDE:
        dest = dest.to(tl.int64)
        tok = tok.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        hc = h0 + tl.arange(0, BLOCK_H)
        m = valid[:, None] & (hc < H)[None, :]
        v = tl.load(x_ptr + tok[:, None] * H + hc[None, :], mask=m)
        tl.store(out_ptr + dest[:, None] * H + hc[None, :], v, mask=m)
    return next_row + tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _scatter(x_ptr, ids_ptr, base_ptr, out_ptr, row_src_ptr, pair_row_ptr, P, E, H, K, num_chunks, subs,
             SUB: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    colf = cols.to(tl.float32)
    local = tl.arange(0, SUB)
    localf = local.to(tl.float32)
    for c in range(pid, num_chunks, nprog):
        # each expert's next free row for this chunk, advanced sub-block by sub-block
        next_row = tl.load(base_ptr + c * E + cols, mask=cols < E, other=0)
        for s in range(subs):
            next_row = _scatter_block(x_ptr, ids_ptr, out_ptr, row_src_ptr, pair_row_ptr,
                                      (c * subs + s) * SUB + local, localf, next_row, colf, P, E, H, K,
                                      BLOCK_H, WIDE)


def permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int):
    """``(permuted_x, tokens_per_expert, group_ends, row_src, pair_row)``; see mojo_opset.contract.names."""
    x = x.contiguous()
    ids = topk_ids.to(torch.int32).contiguous().view(-1)
    T, H = x.shape
    E, A = int(num_experts), int(align)
    P = ids.numel()
    R = P if A == 1 else P + E * (A - 1)
    dev = x.device
    padded = A > 1  # padding rows exist: they must read as zero / -1
    out = (torch.zeros if padded else torch.empty)(R, H, dtype=x.dtype, device=dev)
    row_src = (torch.full((R,), -1, dtype=torch.int32, device=dev) if padded
               else torch.empty(R, dtype=torch.int32, device=dev))
    pair_row = torch.empty(P, dtype=torch.int32, device=dev)
    tpe = torch.zeros(E, dtype=torch.int32, device=dev)
    ends = torch.zeros(E, dtype=torch.int32, device=dev)
    if P == 0:
        return out, tpe, ends, row_src, pair_row
    block_e = triton.next_power_of_2(E)
    sub = max(16, min(128, TILE_ELEMS // block_e, triton.next_power_of_2(P)))
    blocks = triton.cdiv(P, sub)
    programs = num_programs(dev, blocks)
    # chunks of several sub-blocks: a few per program keeps the serial scan and the [chunks, E]
    # scratch small however large T is
    subs = triton.cdiv(blocks, CHUNKS_PER_PROGRAM * programs)
    chunks = triton.cdiv(blocks, subs)
    counts = torch.empty(chunks, E, dtype=torch.int32, device=dev)
    base = torch.empty(chunks, E, dtype=torch.int32, device=dev)
    grid = (min(programs, chunks),)
    _chunk_count[grid](ids, counts, P, E, chunks, subs, SUB=sub, BLOCK_E=block_e)
    _scan[(1,)](counts, base, tpe, ends, E, chunks, ALIGN=A, BLOCK_E=block_e)
    _scatter[grid](x, ids, base, out, row_src, pair_row, P, E, H, int(topk_ids.shape[1]), chunks, subs,
                   SUB=sub, BLOCK_E=block_e, BLOCK_H=min(128, triton.next_power_of_2(H)),
                   WIDE=needs_int64(R * H, T * H))
    return out, tpe, ends, row_src, pair_row
