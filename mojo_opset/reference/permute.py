"""Permute (dispatch): order the T*K (token, slot) pairs by expert, stably, with optional alignment.

No host synchronisation: the padded size depends on the data, so with ``align > 1`` the output has
the worst-case ``T*K + E*(align-1)`` rows and the valid count lives on the device (``group_ends[-1]``).
"""
from __future__ import annotations

import torch

from ..contract.shapes import padded_rows
from ..modes import is_deterministic
from .fused import fused


def permute_reference(x, topk_ids, num_experts, align=1):
    """Returns (permuted_x, tokens_per_expert, group_ends, row_src, pair_row); see mojo_opset.contract.PermuteCall."""
    T, K = topk_ids.shape
    E, H = num_experts, x.shape[-1]
    P = T * K
    dev = x.device
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices                   # pairs by expert, stable in p
    counts = torch.zeros(E, dtype=torch.int64, device=dev).index_add_(0, flat, torch.ones_like(flat))
    padded = counts if align == 1 else (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    sorted_e = flat[order]
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (ends - padded)[sorted_e] + rank                           # permuted row of sorted pair
    R = padded_rows(P, E, align)
    pair_row = torch.empty(P, dtype=torch.int64, device=dev)
    pair_row[order] = dest
    row_src = torch.full((R,), -1, dtype=torch.int64, device=dev)
    row_src[dest] = order
    if torch.compiler.is_compiling():   # plain autograd: Inductor fuses these steps in the graph itself
        permuted = x.new_zeros(R, H)
        permuted[dest] = x[order // K]
    else:
        permuted = _GatherTokens.apply(x, row_src, pair_row, K, align > 1)
    return (permuted, counts.to(torch.int32), ends.to(torch.int32), row_src.to(torch.int32),
            pair_row.to(torch.int32))


@fused
def _sum_slots(grad, pair_row):
    """dx[t] = sum_j grad[pair_row[t, j]]: fp32 accumulation in slot order, no atomics."""
    acc = grad.index_select(0, pair_row[:, 0]).float()
    for j in range(1, pair_row.shape[1]):
        acc = acc + grad.index_select(0, pair_row[:, j]).float()
    return acc.to(grad.dtype)


class _GatherTokens(torch.autograd.Function):
    """Row r of the output is x[row_src[r] // K] (zero where row_src < 0, the padding rows); the
    gradient of a token sums its K rows deterministically."""

    @staticmethod
    def forward(ctx, x, row_src, pair_row, top_k, padded):
        if x.shape[0] == 0:   # no tokens: padding rows only
            out = x.new_zeros(row_src.shape[0], x.shape[1])
        else:
            out = x.index_select(0, row_src.clamp(min=0) // top_k)
        if padded:
            out.masked_fill_((row_src < 0).unsqueeze(1), 0)
        ctx.save_for_backward(pair_row)
        ctx.top_k = top_k
        ctx.deterministic = is_deterministic()   # the backward may run outside the mode's context
        return out

    @staticmethod
    def backward(ctx, grad):
        (pair_row,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        sum_slots = _sum_slots.eager if ctx.deterministic else _sum_slots
        return sum_slots(grad.contiguous(), pair_row.view(-1, ctx.top_k)), None, None, None, None
