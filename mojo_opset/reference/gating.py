"""The reference routing from logits (SPEC §3.1 steps 2-7): scores, (group-limited) top-k with
ties to the lower id and NaN last, weights, and router replay (full or partial)."""
from __future__ import annotations

import torch

from .invariant import slot_sum

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


def compute_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)


def weights_from_ids(scores: torch.Tensor, ids: torch.Tensor, route_norm: bool, route_scale: float,
                     deterministic: bool = False) -> torch.Tensor:
    """Step 6: gather the (unbiased) scores of the chosen experts, normalise, scale.
    ``deterministic``: the normalising sum adds the slots in order (a torch reduction's thread
    layout follows the number of rows)."""
    w = scores.gather(1, ids.long())
    if route_norm:
        total = slot_sum(w) if deterministic else w.sum(dim=-1, keepdim=True)
        w = w / (total + 1e-20)
    if route_scale != 1.0:
        w = w * route_scale
    return w


def _stable_desc_order(key: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``key`` descending along the last dim; ties keep the lower index."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def group_eligibility(choice: torch.Tensor, num_expert_groups: int, num_limited_groups: int,
                      group_score: str) -> torch.Tensor:
    """Boolean [T, E]: experts in the ``num_limited_groups`` best groups (ties: lower group id).

    ``choice`` must hold no NaN (the caller maps NaN to -inf); a NaN group score (inf + -inf) ranks last."""
    T, E = choice.shape
    g = choice.view(T, num_expert_groups, E // num_expert_groups)
    if group_score == "max" or g.shape[-1] == 1:
        gs = g.max(dim=-1).values
    else:
        gs = g.topk(2, dim=-1).values.sum(dim=-1)
    gs = gs.masked_fill(torch.isnan(gs), float("-inf"))
    keep = _stable_desc_order(gs)[:, :num_limited_groups]
    gmask = torch.zeros(T, num_expert_groups, dtype=torch.bool, device=choice.device)
    gmask.scatter_(1, keep, True)
    return gmask.repeat_interleave(E // num_expert_groups, dim=1)


def rank_experts(scores: torch.Tensor, expert_bias, num_expert_groups: int, num_limited_groups: int,
                 group_score: str) -> torch.Tensor:
    """Steps 3-5 for every expert: ``[T, E]`` expert ids, best first (eligible, then not NaN, then
    choice descending, then lower id).  NaN ranks below every number, -inf included."""
    choice = scores if expert_bias is None else scores + expert_bias.float()
    is_num = ~torch.isnan(choice)
    choice = choice.masked_fill(~is_num, float("-inf"))
    order = _stable_desc_order(choice)
    limited = num_expert_groups > 1 and num_limited_groups < num_expert_groups
    if limited or expert_bias is not None:  # else scores lie in [0, 1]: no -inf can tie with a NaN
        rank = is_num.to(torch.int8)
        if limited:
            eligible = group_eligibility(choice, num_expert_groups, num_limited_groups, group_score)
            rank = rank + 2 * eligible.to(torch.int8)
        # a stable re-sort by rank class keeps the choice order inside each class
        order = order.gather(1, _stable_desc_order(rank.gather(1, order)))
    return order


def select_experts(scores: torch.Tensor, top_k: int, expert_bias, num_expert_groups: int,
                   num_limited_groups: int, group_score: str) -> torch.Tensor:
    """Steps 3-5: the K eligible experts with the highest choice score, lowest id on ties; int32."""
    order = rank_experts(scores, expert_bias, num_expert_groups, num_limited_groups, group_score)
    return order[:, :top_k].to(torch.int32)


def fill_partial(forced: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Partial replay: the -1 slots of each row of ``forced`` ``[T, K]`` take, in slot order, the
    best-ranked experts of ``order`` ``[T, E]`` (from :func:`rank_experts`) not forced elsewhere in
    that row.  Slots with an id keep it.  Returns int32 ``[T, K]``."""
    T, K = forced.shape
    forced = forced.long()
    free = forced < 0
    E = order.shape[1]
    taken = torch.zeros(T, E + 1, dtype=torch.bool, device=order.device)
    taken.scatter_(1, torch.where(free, E, forced), True)   # -1 slots mark the spare column E
    avail = ~taken[:, :E].gather(1, order)                  # per ranked position: not forced in the row
    cand = order.gather(1, _stable_desc_order(avail.to(torch.int8)))[:, :K]
    nth_free = (torch.cumsum(free.to(torch.int64), dim=1) - 1).clamp(min=0)
    return torch.where(free, cand.gather(1, nth_free), forced).to(torch.int32)


def gating_reference(logits, top_k, score_func="softmax", route_norm=False, route_scale=1.0,
                     expert_bias=None, num_expert_groups=1, num_limited_groups=1,
                     group_score="top2_sum", forced_expert_ids=None, partial_replay=None, deterministic=False):
    """The reference routing from logits; returns (topk_ids int32, topk_weights fp32, scores fp32).

    ``partial_replay``: whether ``forced_expert_ids`` may hold -1 slots (None: look at the values).
    ``deterministic``: batch-invariant weights (each row's bits independent of the other rows)."""
    if partial_replay is None:
        partial_replay = forced_expert_ids is not None and bool((forced_expert_ids < 0).any())
    scores = compute_scores(logits, score_func)
    if forced_expert_ids is not None and not partial_replay:
        ids = forced_expert_ids.to(torch.int32)
    elif forced_expert_ids is not None:
        order = rank_experts(scores, expert_bias, num_expert_groups, num_limited_groups, group_score)
        ids = fill_partial(forced_expert_ids, order)
    else:
        ids = select_experts(scores, top_k, expert_bias, num_expert_groups, num_limited_groups, group_score)
    weights = weights_from_ids(scores, ids, route_norm, route_scale, deterministic)
    return ids, weights, scores


