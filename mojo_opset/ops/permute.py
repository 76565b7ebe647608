"""Permute (dispatch): order the T*K (token, slot) pairs by expert, stably, with optional alignment.

No host synchronisation: the padded size depends on the data, so with ``align > 1`` the output has
the worst-case ``T*K + E*(align-1)`` rows and the valid count lives on the device (``group_ends[-1]``).
"""
from __future__ import annotations

import torch


def padded_rows(num_pairs: int, num_experts: int, align: int) -> int:
    return num_pairs if align == 1 else num_pairs + num_experts * (align - 1)


def permute_reference(x, topk_ids, num_experts, align=1):
    """Returns (permuted_x, tokens_per_expert, group_ends, row_src, pair_row); see ops/names.py."""
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
    permuted = x.new_zeros(R, H)
    permuted[dest] = x[order // K]
    return (permuted, counts.to(torch.int32), ends.to(torch.int32), row_src.to(torch.int32),
            pair_row.to(torch.int32))
