"""The two EP exchanges.  Both hand ``experts_fn`` only the (token, slot) pairs of this rank's
experts, as rows of K=1 with local ids in ``[0, E_local)`` and weight 1, so any backend's local
experts op serves them; the router weights are applied here in fp32, as the combine op does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .agreement import EPCall
from .collectives import AllToAllRows, GatherTokens, ReduceScatterTokens, all_to_all_rows
from .layout import expert_owner, expert_ranges


def _run_local(experts_fn, rows, local_ids, expert_offset):
    """Expert outputs of ``rows`` (unweighted); zero rows stay connected to the graph."""
    if rows.shape[0] == 0:
        return rows * 0
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    return experts_fn(rows, local_ids.to(torch.int32).view(-1, 1), ones, expert_offset)


def _weighted_sum(rows, row_of_pair, weights):
    """``out[t] = sum_j weights[t, j] * rows[row_of_pair[t, j]]`` in fp32, slot by slot (deterministic)."""
    out = None
    for j in range(row_of_pair.shape[1]):
        term = rows[row_of_pair[:, j]].float() * weights[:, j:j + 1]
        out = term if out is None else out + term
    return out


def allgather_forward(call: EPCall, x2, ids, weights, experts_fn):
    """Gather every rank's tokens (padded to the largest T), run the local experts on the pairs
    routed to them, reduce-scatter the fp32 partial sums back to the tokens' ranks."""
    T, H = x2.shape
    K, W = ids.shape[1], call.world
    Tm = max(call.tokens)
    if Tm == 0:
        return x2 * 0
    lo, hi = call.expert_range
    pad = Tm - T
    xg, wg, ig = GatherTokens.apply(call.anchor(x2.device), call.group, F.pad(x2, (0, 0, 0, pad)),
                                    F.pad(weights.float(), (0, 0, 0, pad)),
                                    F.pad(ids.to(torch.int32), (0, 0, 0, pad), value=-1))
    local = (ig >= lo) & (ig < hi)                                    # [W*Tm, K]; padding is never local
    pairs = local.reshape(-1).nonzero().squeeze(1)                    # host sync: the local row count
    y = _run_local(experts_fn, xg[pairs // K], ig.reshape(-1)[pairs] - lo, lo)
    # pair -> its row of y, or the appended zero row
    row_of_pair = torch.full((W * Tm * K,), pairs.shape[0], dtype=torch.int64, device=x2.device)
    row_of_pair[pairs] = torch.arange(pairs.shape[0], device=x2.device)
    y0 = torch.cat([y, y.new_zeros(1, H)])
    partial = _weighted_sum(y0, row_of_pair.view(-1, K), torch.where(local, wg, wg.new_zeros(())))
    out = ReduceScatterTokens.apply(call.anchor(x2.device), call.group, partial, xg)
    return out[:T].to(x2.dtype)


def alltoall_forward(call: EPCall, x2, ids, weights, experts_fn):
    """Exchange counts, send each (token, slot) pair's row to the rank owning its expert, run the
    local experts there, send the results back, combine with the router weights here."""
    T, H = x2.shape
    K, W = ids.shape[1], call.world
    dev = x2.device
    flat = ids.reshape(-1).long()
    dest = expert_owner(flat, call.num_experts, W)
    order = torch.sort(dest, stable=True).indices                    # pairs grouped by rank, stable
    starts = torch.tensor([lo for lo, _ in expert_ranges(call.num_experts, W)], device=dev)
    counts = torch.bincount(dest, minlength=W)
    recv_counts = all_to_all_rows(counts, [1] * W, [1] * W, call.group)
    send, recv = counts.tolist(), recv_counts.tolist()               # host sync: split sizes
    local_ids = (flat - starts[dest])[order].to(torch.int32).view(-1, 1)
    anchor = call.anchor(dev)
    rows, rows_ids = AllToAllRows.apply(anchor, call.group, x2[order // K], send, recv, local_ids, None)
    lo, _ = call.expert_range
    y = _run_local(experts_fn, rows, rows_ids.view(-1), lo)
    back, _ = AllToAllRows.apply(anchor, call.group, y, recv, send, None, rows)
    row_of_pair = torch.empty_like(order)
    row_of_pair[order] = torch.arange(order.shape[0], device=dev)
    return _weighted_sum(back, row_of_pair.view(T, K), weights.float()).to(x2.dtype)
