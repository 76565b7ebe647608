"""Routing comparison: exact id agreement, except where the reference itself sits on a near-tie.

A row whose ids differ from the reference's is accepted only when the other choice is equally good
within the near-tie margin ``eps`` (relative, by the logits' dtype, see ``accuracy.TIE_EPS``):

* the K chosen choice values (``scores + expert_bias``), position by position, are within ``eps`` of
  the reference's top-K values over the experts the backend could legitimately consider;
* with group-limited routing, the chosen experts lie in at most ``num_limited_groups`` groups, every
  group clearly above the L-th best group score is kept, and no group clearly below it is used;
* an *exact* tie (bit-equal choice values) must still go to the lower expert id, as the spec demands;
* ids are int32, in ``[0, E)`` and distinct within a row, always.

Forced ids (router replay) must be returned unchanged.
"""
from __future__ import annotations

import torch

from .accuracy import EXACT, Diff, tie_eps


def _close(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    same = a == b                                  # also covers -inf == -inf (NaN rows)
    scale = torch.maximum(a.abs(), b.abs()).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return same | ((a - b).abs() <= eps * torch.clamp(scale, min=1e-30))


def _group_scores(choice_row: torch.Tensor, G: int, group_score: str) -> torch.Tensor:
    g = choice_row.view(G, -1)
    if group_score == "max" or g.shape[1] == 1:
        return g.max(dim=1).values
    return g.topk(2, dim=1).values.sum(dim=1)


def _row_acceptable(got: torch.Tensor, ref: torch.Tensor, choice: torch.Tensor, K: int, G: int, L: int,
                    group_score: str, eps: float) -> str | None:
    """None if ``got`` is an equally good routing of this row, else why not."""
    E = choice.numel()
    pool_mask = torch.ones(E, dtype=torch.bool)
    if G > 1 and L < G:
        per = E // G
        gs = _group_scores(choice, G, group_score)
        s_l = gs.sort(descending=True).values[L - 1]
        tol = eps * max(abs(float(s_l)), 1e-30)
        required = {int(g) for g in (gs > s_l + tol).nonzero().flatten()}
        allowed = {int(g) for g in (gs >= s_l - tol).nonzero().flatten()}
        used = {int(i) // per for i in got.tolist()}
        if not used <= allowed:
            return f"uses group(s) {sorted(used - allowed)} whose score is clearly below the kept groups"
        chosen = required | used
        if len(chosen) > L:
            return f"uses {len(chosen)} groups (with the clearly-kept ones); at most {L} may be kept"
        # fill up to L groups with the borderline groups least able to displace the chosen experts
        spare = sorted(allowed - chosen, key=lambda g: float(choice[g * per:(g + 1) * per].max()))
        chosen |= set(spare[: L - len(chosen)])
        pool_mask = torch.zeros(E, dtype=torch.bool)
        for g in chosen:
            pool_mask[g * per:(g + 1) * per] = True
    pool = torch.where(pool_mask, choice, torch.full_like(choice, float("-inf")))
    best = pool.sort(descending=True).values[:K]
    got_vals = choice[got.long()]
    if not bool(_close(got_vals, best, eps).all()):
        return "not a near-tie: chosen values " + ", ".join(f"{v:.6g}" for v in got_vals.tolist()) + \
            " vs best " + ", ".join(f"{v:.6g}" for v in best.tolist())
    ref_vals = choice[ref.long()]
    for j in range(K):
        if int(got[j]) != int(ref[j]) and bool(got_vals[j] == ref_vals[j]) and int(got[j]) > int(ref[j]):
            return f"exact tie at slot {j} broken toward the higher id ({int(got[j])} instead of {int(ref[j])})"
    return None


def compare_routing(got_ids, ref_ids, scores, *, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                    group_score="top2_sum", logits_dtype=torch.float32, forced=False):
    """Compare a backend's ``topk_ids`` with the reference's.

    ``scores``: the reference's fp32 scores ``[T, E]``.  Returns ``(Diff, accepted_tie_rows)``;
    the Diff counts bad rows out of T."""
    T, K = ref_ids.shape
    E = scores.shape[1] if scores.dim() == 2 else 0
    if not isinstance(got_ids, torch.Tensor) or tuple(got_ids.shape) != (T, K):
        shape = list(got_ids.shape) if isinstance(got_ids, torch.Tensor) else type(got_ids).__name__
        return Diff("topk_ids", 0.0, 0.0, max(T, 1), max(T, 1), EXACT, f"!shape {shape}, expected {[T, K]}"), 0
    if got_ids.dtype != torch.int32:
        return Diff("topk_ids", 0.0, 0.0, max(T, 1), max(T, 1), EXACT, f"!dtype {got_ids.dtype}, expected torch.int32"), 0
    if T == 0:
        return Diff("topk_ids", 0.0, 0.0, 0, 0, EXACT), 0
    got, ref = got_ids.detach().cpu().long(), ref_ids.detach().cpu().long()
    bad_rows: list[tuple[int, str]] = []
    in_range = ((got >= 0) & (got < E)).all(dim=1)
    srt = got.sort(dim=1).values
    distinct = (srt[:, 1:] != srt[:, :-1]).all(dim=1) if K > 1 else torch.ones(T, dtype=torch.bool)
    differs = (got != ref).any(dim=1)
    choice = scores.detach().cpu().float()
    if expert_bias is not None:
        choice = choice + expert_bias.detach().cpu().float()
    choice = torch.nan_to_num(choice, nan=float("-inf"))
    eps = tie_eps(logits_dtype)
    G = num_expert_groups
    L = G if num_limited_groups is None else num_limited_groups
    accepted = 0
    for t in (differs | ~in_range | ~distinct).nonzero().flatten().tolist():
        if not bool(in_range[t]):
            why = f"id out of range [0, {E})"
        elif not bool(distinct[t]):
            why = "repeated expert id"
        elif forced:
            why = "forced ids were not used as given"
        else:
            why = _row_acceptable(got[t], ref[t], choice[t], K, G, L, group_score, eps)
            if why is None:
                accepted += 1
                continue
        bad_rows.append((t, why))
    note = ""
    if bad_rows:
        t, why = bad_rows[0]
        note = f"row {t}: {got[t].tolist()} vs reference {ref[t].tolist()} ({why})"
    return Diff("topk_ids", 0.0, 0.0, len(bad_rows), T, EXACT, note, unit="rows"), accepted
