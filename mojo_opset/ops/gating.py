"""MoE gating (SPEC §3.1): router GEMM, scores, (group-limited) top-k, weights, router replay."""
from __future__ import annotations

import numbers

import torch

from .. import dispatch as _dispatch
from ..validation import FLOAT_DTYPES, check_choice, check_int, check_tensor, fail
from .names import MOE_GATING
from .router_gemm import router_logits

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


# --------------------------------------------------------------------------- reference

def compute_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)


def weights_from_ids(scores: torch.Tensor, ids: torch.Tensor, route_norm: bool, route_scale: float) -> torch.Tensor:
    """Step 6: gather the (unbiased) scores of the chosen experts, normalise, scale."""
    w = scores.gather(1, ids.long())
    if route_norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
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


def select_experts(scores: torch.Tensor, top_k: int, expert_bias, num_expert_groups: int,
                   num_limited_groups: int, group_score: str) -> torch.Tensor:
    """Steps 3-5: the K eligible experts with the highest choice score, lowest id on ties; int32.

    NaN ranks below every number, -inf included: experts are ordered by (eligible, not NaN, choice)."""
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
    return order[:, :top_k].to(torch.int32)


def gating_reference(logits, top_k, score_func="softmax", route_norm=False, route_scale=1.0,
                     expert_bias=None, num_expert_groups=1, num_limited_groups=1,
                     group_score="top2_sum", forced_expert_ids=None):
    """The reference routing from logits; returns (topk_ids int32, topk_weights fp32, scores fp32)."""
    scores = compute_scores(logits, score_func)
    if forced_expert_ids is not None:
        ids = forced_expert_ids.to(torch.int32)
    else:
        ids = select_experts(scores, top_k, expert_bias, num_expert_groups, num_limited_groups, group_score)
    weights = weights_from_ids(scores, ids, route_norm, route_scale)
    return ids, weights, scores


# --------------------------------------------------------------------------- validation

def validate_forced_ids(forced, T: int, top_k: int, E: int, device) -> torch.Tensor:
    check_tensor("forced_expert_ids", forced, ndim=2)
    if forced.dtype.is_floating_point or forced.dtype.is_complex or forced.dtype == torch.bool:
        fail(f"forced_expert_ids must have an integer dtype, got {str(forced.dtype).replace('torch.', '')}", TypeError)
    if tuple(forced.shape) != (T, top_k):
        fail(f"forced_expert_ids must have shape [T, top_k] = [{T}, {top_k}], got {list(forced.shape)}")
    forced = forced.to(device=device, dtype=torch.int64)
    if forced.device.type == "meta" or not forced.numel():
        return forced  # no values to check
    bad = (forced < 0) | (forced >= E)
    dup = None
    if top_k > 1:
        s = forced.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
    if torch.compiler.is_compiling():
        # a graph cannot branch on values: assert on the device instead
        torch._assert_async(~bad.any(), f"forced_expert_ids must lie in [0, {E})")
        if dup is not None:
            torch._assert_async(~dup.any(), "forced_expert_ids must not repeat an expert within a row")
        return forced
    # eager: one host check at validation time (replay is not the decode hot path); errors must be clear
    if bool(bad.any()):
        r = int(bad.any(dim=1).nonzero()[0, 0])
        fail(f"forced_expert_ids must lie in [0, {E}); row {r} is {forced[r].tolist()}")
    if dup is not None and bool(dup.any()):
        r = int(dup.nonzero()[0, 0])
        fail(f"forced_expert_ids must not repeat an expert within a row; row {r} is {forced[r].tolist()}")
    return forced


def normalize_routing(x, gate_weight, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
                      route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                      group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None):
    """Validate the routing arguments; returns (x2d, options dict for the gating op)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        fail(f"x must have shape [..., H], got {list(x.shape)}")
    H = x.shape[-1]
    if H < 1:
        fail(f"x must have a non-empty last dimension H, got shape {list(x.shape)}")
    x2 = x.reshape(-1, H)
    dev = x.device
    check_tensor("gate_weight", gate_weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    E = gate_weight.shape[0]
    if gate_weight.shape[1] != H:
        fail(f"gate_weight must have shape [E, H] with H = x.shape[-1] = {H}, got {list(gate_weight.shape)}")
    if E < 1:
        fail("gate_weight must have at least one expert row (E >= 1)")
    top_k = check_int("top_k", top_k)
    if top_k <= 0 or top_k > E:
        fail(f"top_k must satisfy 0 < top_k <= E = {E}, got {top_k}")
    if gate_bias is not None:
        check_tensor("gate_bias", gate_bias, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
    check_choice("score_func", score_func, SCORE_FUNCS)
    check_choice("group_score", group_score, GROUP_SCORES)
    if not isinstance(route_norm, bool):
        fail(f"route_norm must be a bool, got {type(route_norm).__name__}", TypeError)
    if not isinstance(route_scale, numbers.Real) or isinstance(route_scale, bool):
        fail(f"route_scale must be a float, got {type(route_scale).__name__}", TypeError)
    route_scale = float(route_scale)
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
        expert_bias = expert_bias.float()
    G = check_int("num_expert_groups", num_expert_groups, lo=1)
    if E % G:
        fail(f"num_expert_groups must divide E = {E}, got {G}")
    L = G if num_limited_groups is None else check_int("num_limited_groups", num_limited_groups, lo=1, hi=G)
    if L * (E // G) < top_k:
        fail(f"num_limited_groups x experts per group must be >= top_k: {L} x {E // G} < {top_k}")
    if router_dtype is not None and router_dtype not in FLOAT_DTYPES:
        fail(f"router_dtype must be torch.float32, torch.bfloat16, torch.float16 or None, got {router_dtype}", TypeError)
    if forced_expert_ids is not None:
        forced_expert_ids = validate_forced_ids(forced_expert_ids, x2.shape[0], top_k, E, dev)
    opts = dict(top_k=top_k, score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                expert_bias=expert_bias, num_expert_groups=G, num_limited_groups=L,
                group_score=group_score, forced_expert_ids=forced_expert_ids)
    return x2, opts


# --------------------------------------------------------------------------- dispatch

def route(x2, gate_weight, gate_bias, router_dtype, opts, backend=None):
    """Router GEMM (core) + the dispatched gating op.  Returns (ids, weights, scores)."""
    logits = router_logits(x2, gate_weight, gate_bias, router_dtype)
    call = dict(logits=logits, **opts)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    (ids, weights, scores), served_by = _dispatch.dispatch(
        MOE_GATING, gating_reference, call, device=x2.device, backend=backend, grad_rebuilt=True)
    if needs_grad and served_by == "kernel":
        # kernels need no backward: rebuild the differentiable outputs from their ids
        scores = compute_scores(logits, opts["score_func"])
        weights = weights_from_ids(scores, ids, opts["route_norm"], opts["route_scale"])
    return ids, weights, scores


def moe_gating(x, gate_weight, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
               route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
               group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None,
               backend=None, return_scores=False):
    """Route tokens to experts.  Returns ``(topk_ids int32 [T, K], topk_weights fp32 [T, K])``
    (and ``scores fp32 [T, E]`` with ``return_scores=True``); T = prod(x.shape[:-1]).

    See docs/ops.md for every argument."""
    x2, opts = normalize_routing(
        x, gate_weight, top_k, gate_bias=gate_bias, score_func=score_func, route_norm=route_norm,
        route_scale=route_scale, expert_bias=expert_bias, num_expert_groups=num_expert_groups,
        num_limited_groups=num_limited_groups, group_score=group_score, router_dtype=router_dtype,
        forced_expert_ids=forced_expert_ids)
    ids, weights, scores = route(x2, gate_weight, gate_bias, router_dtype, opts, backend)
    return (ids, weights, scores) if return_scores else (ids, weights)
