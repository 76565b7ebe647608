"""``moe_gating`` (SPEC §3.1): the router GEMM in the core, then the dispatched gating op."""
from __future__ import annotations

import torch

from ..contract.calls import GatingCall, RoutingOptions
from ..dispatch import dispatch
from ..modes import resolve
from ..reference.gating import compute_scores, gating_reference, weights_from_ids
from ..reference.router_gemm import router_logits
from .routing import normalize_routing, routing_kwargs


def gating_reference_call(call: GatingCall):
    return gating_reference(call.logits, **routing_kwargs(call.routing), deterministic=call.deterministic)


def _with_reference_grad(kernel_value: torch.Tensor, reference_value: torch.Tensor) -> torch.Tensor:
    """The kernel's value exactly, with the reference formula's gradient (x + (r - r) == x)."""
    return kernel_value.detach() + (reference_value - reference_value.detach())


def route(x2: torch.Tensor, gate_weight: torch.Tensor, gate_bias, router_dtype, routing: RoutingOptions,
          backend=None, deterministic=None):
    """Router GEMM + the dispatched gating op.  Returns ``(ids, weights, scores, logits)``.

    Gating kernels need no backward: when the logits require grad, the outputs keep the kernel's
    values (so replaying its ids is bit-identical with or without gradients) and take their
    gradient from the reference formulas.  ``deterministic``: None reads the calling context's mode."""
    det = resolve(deterministic)
    logits = router_logits(x2, gate_weight, gate_bias, router_dtype, det)
    call = GatingCall(logits=logits, routing=routing, deterministic=det)
    (ids, weights, scores), served_by = dispatch(call, gating_reference_call, backend=backend, grad_rebuilt=True)
    if served_by == "kernel" and torch.is_grad_enabled() and logits.requires_grad:
        ref_scores = compute_scores(logits, routing.score_func)
        ref_weights = weights_from_ids(ref_scores, ids, routing.route_norm, routing.route_scale, det)
        scores = _with_reference_grad(scores, ref_scores)
        weights = _with_reference_grad(weights, ref_weights)
    return ids, weights, scores, logits


def moe_gating(x, gate_weight, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
               route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
               group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None,
               backend=None, return_scores=False):
    """Route tokens to experts.  Returns ``(topk_ids int32 [T, K], topk_weights fp32 [T, K])``
    (and ``scores fp32 [T, E]`` with ``return_scores=True``); T = prod(x.shape[:-1]).

    See docs/ops.md for every argument."""
    x2, routing = normalize_routing(
        x, gate_weight, top_k, gate_bias=gate_bias, score_func=score_func, route_norm=route_norm,
        route_scale=route_scale, expert_bias=expert_bias, num_expert_groups=num_expert_groups,
        num_limited_groups=num_limited_groups, group_score=group_score, router_dtype=router_dtype,
        forced_expert_ids=forced_expert_ids)
    ids, weights, scores, _ = route(x2, gate_weight, gate_bias, router_dtype, routing, backend)
    return (ids, weights, scores) if return_scores else (ids, weights)
