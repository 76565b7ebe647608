"""Differentiable collectives on row blocks, backend-independent (gloo, NCCL, HCCL, ...).

Several tensors of one exchange travel as one byte buffer (one collective instead of three).
Every function takes an ``anchor``: a scalar that requires grad on every rank as soon as any rank
needs gradients, so each rank records the same collectives and runs the same backward
collectives -- a rank whose own inputs need no gradient must still take part in the others'.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives; older releases only have the first names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """``[n, ...]`` on each of W ranks -> ``[W*n, ...]`` in rank order (no autograd)."""
    out = t.new_empty((dist.get_world_size(group) * t.shape[0],) + tuple(t.shape[1:]))
    _all_gather(out, t.contiguous(), group=group)
    return out


def reduce_scatter_rows(t: torch.Tensor, group) -> torch.Tensor:
    """``[W*n, ...]`` summed over ranks; rank r keeps rows ``r*n:(r+1)*n`` (no autograd)."""
    out = t.new_empty((t.shape[0] // dist.get_world_size(group),) + tuple(t.shape[1:]))
    _reduce_scatter(out, t.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


def all_to_all_rows(t: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Send ``t[rows of block d]`` to rank d (block sizes ``send``), receive ``sum(recv)`` rows."""
    out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """Row-wise byte concatenation of 2-D tensors with equal row counts -> uint8 ``[n, bytes]``."""
    return torch.cat([t.contiguous().view(torch.uint8) for t in tensors], dim=1)


def unpack(buf: torch.Tensor, like: tuple[tuple[torch.dtype, int], ...]) -> list[torch.Tensor]:
    """Inverse of :func:`pack`; ``like`` lists (dtype, columns) of each packed tensor."""
    out, col = [], 0
    for dtype, cols in like:
        width = cols * torch.empty((), dtype=dtype).element_size()
        # a fresh copy: a view may start at a byte offset the wider dtype cannot be viewed at
        out.append(buf[:, col:col + width].clone(memory_format=torch.contiguous_format).view(dtype))
        col += width
    return out


def _layout(*tensors: torch.Tensor) -> tuple[tuple[torch.dtype, int], ...]:
    return tuple((t.dtype, t.shape[1]) for t in tensors)


class GatherTokens(torch.autograd.Function):
    """all-gather of (x ``[n, H]``, weights fp32 ``[n, K]``, ids int32 ``[n, K]``), n equal on all ranks.

    Backward: the gradients of x and weights are reduce-scattered (summed) in fp32, in one collective."""

    @staticmethod
    def forward(ctx, anchor, group, x, weights, ids):
        ctx.group, ctx.x_dtype, ctx.H = group, x.dtype, x.shape[1]
        xg, wg, ig = unpack(all_gather_rows(pack(x, weights, ids), group), _layout(x, weights, ids))
        ctx.mark_non_differentiable(ig)
        return xg, wg, ig

    @staticmethod
    def backward(ctx, gx, gw, _gi):
        # runs on every rank (the anchor guarantees it), so the collective always pairs up
        g = reduce_scatter_rows(torch.cat([gx.float(), gw.float()], dim=1), ctx.group)
        return None, None, g[:, :ctx.H].to(ctx.x_dtype), g[:, ctx.H:], None


class ReduceScatterTokens(torch.autograd.Function):
    """Sum the per-rank partial outputs ``[W*n, H]`` (fp32); each rank keeps its own n rows.

    ``link`` (unused in forward) ties the upstream exchange into this node's backward, so that
    exchange's backward runs even where the local expert output does not depend on it."""

    @staticmethod
    def forward(ctx, anchor, group, partial, link):
        ctx.group = group
        return reduce_scatter_rows(partial, group)

    @staticmethod
    def backward(ctx, g):
        return None, None, all_gather_rows(g, ctx.group), None


class AllToAllRows(torch.autograd.Function):
    """Variable-size all-to-all of rows (plus optional non-differentiable int32 columns ``extra``).

    Backward sends the row gradients back along the reversed splits.  ``link``: as in
    :class:`ReduceScatterTokens`."""

    @staticmethod
    def forward(ctx, anchor, group, rows, send, recv, extra, link):
        ctx.group, ctx.send, ctx.recv = group, send, recv
        if extra is None:
            return all_to_all_rows(rows, send, recv, group), None
        out, out_extra = unpack(all_to_all_rows(pack(rows, extra), send, recv, group), _layout(rows, extra))
        ctx.mark_non_differentiable(out_extra)
        return out, out_extra

    @staticmethod
    def backward(ctx, g, _g_extra):
        return None, None, all_to_all_rows(g, ctx.recv, ctx.send, ctx.group), None, None, None, None
